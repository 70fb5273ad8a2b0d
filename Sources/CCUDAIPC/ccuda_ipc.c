// CCUDAIPC is header-only (include/ccuda_ipc.h); SwiftPM needs one source file per C target.
#include "ccuda_ipc.h"
