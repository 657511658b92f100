// The STTM kernels compiled for the host through the CPU emulator (VIDKERN_EMULATE, see
// ../emulate.h): the same source as the GPU build, registered as torch.ops.vidkern_emu.*.
#include "../sttm.cu"
