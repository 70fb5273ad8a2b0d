#ifndef SWIFT_LYCORIS_CJANSSON_SHIM_H
#define SWIFT_LYCORIS_CJANSSON_SHIM_H
#include <jansson.h>
#endif
