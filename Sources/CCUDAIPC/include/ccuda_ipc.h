#ifndef CCUDA_IPC_H
#define CCUDA_IPC_H

#include <string.h>

/// The driver API's `CUipcMemHandle`: 64 opaque bytes, passed BY VALUE to
/// `cuIpcOpenMemHandle`. Swift cannot declare a C function that takes a 64-byte struct by
/// value, so this trampoline builds the struct and makes the call through the pointer the
/// server found with dlsym — the C compiler then follows the platform's ABI (on x86-64 the
/// struct goes on the stack, on arm64 by reference to a copy).
typedef struct { char reserved[64]; } ccuda_ipc_mem_handle;

typedef int (*ccuda_ipc_open_fn)(unsigned long long *address, ccuda_ipc_mem_handle handle, unsigned int flags);

/// `cuIpcOpenMemHandle_v2(address, handle, flags)` through `function`; `bytes` are the
/// handle's 64 bytes.
static inline int ccuda_ipc_open(void *function, unsigned long long *address, const unsigned char *bytes,
                                 unsigned int flags) {
    ccuda_ipc_mem_handle handle;
    memcpy(handle.reserved, bytes, sizeof handle.reserved);
    return ((ccuda_ipc_open_fn)function)(address, handle, flags);
}

#endif
