#ifndef SWIFT_LYCORIS_CMALLOC_SHIM_H
#define SWIFT_LYCORIS_CMALLOC_SHIM_H
/* glibc's allocator tuning (mallopt), used by the server at start. */
#include <malloc.h>
#endif
