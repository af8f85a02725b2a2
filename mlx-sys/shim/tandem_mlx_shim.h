/* Tandem's additions to the mlx-c 0.7.0 C API.
 *
 * mlx-c always hands MLX an explicit stream. For collectives that is wrong:
 * MLX routes a collective to its group's communication stream only when no
 * stream is given, and on a GPU build the caller's default stream is the GPU
 * stream, on which the ring backend has no kernels (the CUDA build aborts in
 * cudaStreamEndCapture; Metal has no AllReduce on the GPU either). These
 * functions call MLX with no stream, exactly like `mx.distributed.all_sum(x)`
 * in Python. They return 0 on success and report failures through mlx-c's
 * error handler, like every mlx-c function. */
#ifndef TANDEM_MLX_SHIM_H
#define TANDEM_MLX_SHIM_H

#include "mlx/c/array.h"
#include "mlx/c/distributed_group.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The sum of `x` over every rank of `group` (all ranks if `group` is empty),
 * on the communication stream MLX picks for the group's backend. */
int tandem_distributed_all_sum(
    mlx_array* res,
    const mlx_array x,
    const mlx_distributed_group group);

#ifdef __cplusplus
}
#endif

#endif
