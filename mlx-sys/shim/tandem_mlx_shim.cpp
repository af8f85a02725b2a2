// Tandem's additions to the mlx-c 0.7.0 C API; see tandem_mlx_shim.h.

#include "tandem_mlx_shim.h"

#include <optional>
#include <stdexcept>

#include "mlx/c/error.h"
#include "mlx/c/private/mlx.h"
#include "mlx/distributed/ops.h"

namespace {

std::optional<mlx::core::distributed::Group> group_or_world(
    const mlx_distributed_group group) {
  if (!group.ctx) {
    return std::nullopt;
  }
  return mlx_distributed_group_get_(group);
}

} // namespace

extern "C" int tandem_distributed_all_sum(
    mlx_array* res,
    const mlx_array x,
    const mlx_distributed_group group) {
  try {
    // No stream argument: MLX picks the group's communication stream.
    mlx_array_set_(
        *res,
        mlx::core::distributed::all_sum(
            mlx_array_get_(x), group_or_world(group)));
  } catch (std::exception& e) {
    mlx_error(e.what());
    return 1;
  }
  return 0;
}
