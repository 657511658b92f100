// The Python module vidkern._C. Importing it loads this library, whose static initialisers
// (TORCH_LIBRARY_FRAGMENT in each .cu file) register the CUDA ops under torch.ops.vidkern_cuda;
// the module itself has no attributes.
#include <Python.h>

static PyModuleDef vidkern_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "vidkern CUDA kernels, registered as torch.ops.vidkern_cuda.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vidkern_c_module); }
