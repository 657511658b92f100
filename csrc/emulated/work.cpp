// The emulator's work log (../emulate.h: one record per kernel launch) for vidkern.work.emulator:
//   torch.ops.vidkern_emu.work_log(clear) -> (kernels, counts)
// kernels: the launches' names in order; counts: int64 (launches, 10) = grid x, y, z, block x, y,
// z, dynamic shared bytes, global bytes loaded, global bytes stored, multiply-adds. `clear`
// empties the log after reading it.
#include "../compat.h"

#include <string>
#include <tuple>
#include <vector>

namespace {

std::tuple<std::vector<std::string>, at::Tensor> work_log(bool clear) {
  std::lock_guard<std::mutex> lock(vk_emu::log_mutex());
  auto& log = vk_emu::work_log();
  std::vector<std::string> names;
  auto counts = at::empty({static_cast<int64_t>(log.size()), 10}, at::TensorOptions().dtype(at::kLong));
  auto c = counts.accessor<int64_t, 2>();
  for (size_t i = 0; i < log.size(); ++i) {
    const auto& r = log[i];
    names.push_back(r.kernel);
    const int64_t row[10] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z,
                             static_cast<int64_t>(r.dynamic_bytes), static_cast<int64_t>(r.load_bytes),
                             static_cast<int64_t>(r.store_bytes), static_cast<int64_t>(r.macs)};
    for (int j = 0; j < 10; ++j) c[i][j] = row[j];
  }
  if (clear) log.clear();
  return {names, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vidkern_emu, m) {
  m.def("work_log(bool clear=False) -> (str[] kernels, Tensor counts)", &work_log);
}
