/*
 * stage_impl.h - private to stages/: the ops tables the registry points at.
 * A method is "supported" exactly when its ops pointer is non-NULL.
 */
#ifndef MS_STAGE_IMPL_H
#define MS_STAGE_IMPL_H

#include "ms_common.h"
#include "ms_stage.h"

/* Each method's file defines its ops table and replaces NULL here with
 * &ms_stage_<method>_ops when it lands. */
#define MS_STAGE_OPS_LINEAR NULL
#define MS_STAGE_OPS_PASSTHROUGH NULL
#define MS_STAGE_OPS_SLERP NULL
#define MS_STAGE_OPS_TASK_ARITHMETIC NULL
#define MS_STAGE_OPS_TIES NULL

#endif
