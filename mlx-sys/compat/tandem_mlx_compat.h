/*
 * Force-included (`-include`) ahead of every mlx-c translation unit and of the
 * bindgen parse. It closes two gaps that keep mlx-c 0.7.0 from building with
 * gcc 12 on x86-64 Linux; on Apple Silicon both branches switch themselves off.
 *
 * 1. 16-bit floats. mlx-c's `mlx/c/half.h` declares `float16_t` and
 *    `bfloat16_t` (and the HAS_FLOAT16 / HAS_BFLOAT16 switches that expose the
 *    f16/bf16 accessors in array.h) only on ARM. Elsewhere we claim its include
 *    guard and supply the types ourselves: in C++ they are MLX's own 16-bit
 *    structs, so `array.item<float16_t>()` picks the right MLX dtype; in C
 *    (bindgen only) they are plain 16-bit integers, and lib.rs replaces them
 *    with the Rust types mlx-rs expects.
 *
 * 2. `std::format`. mlx-c's private/io.h formats a few error messages with
 *    std::format, which gcc 12's libstdc++ lacks. When the library does not
 *    advertise `__cpp_lib_format` we add a minimal stand-in that understands
 *    only what those messages use: `{}` placeholders and `{{` / `}}`.
 */
#ifndef TANDEM_MLX_COMPAT_H
#define TANDEM_MLX_COMPAT_H

#if !(defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) || defined(__aarch64__))
#define MLX_HALF_H
#define HAS_FLOAT16
#define HAS_BFLOAT16
#ifdef __cplusplus
#include "mlx/types/half_types.h"
typedef mlx::core::float16_t float16_t;
typedef mlx::core::bfloat16_t bfloat16_t;
#else
typedef unsigned short float16_t;
typedef unsigned short bfloat16_t;
#endif
#endif

#ifdef __cplusplus
#include <version>
#ifndef __cpp_lib_format
#include <sstream>
#include <string>
#include <string_view>

namespace std {
namespace tandem_format_detail {

// Copies `text` to `out`, turning `{{` and `}}` into single braces. Returns the
// offset of the first unescaped `{}` placeholder, or npos when there is none.
inline size_t copy_until_placeholder(ostringstream& out, string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    char c = text[i];
    bool doubled = i + 1 < text.size() && text[i + 1] == c;
    if ((c == '{' || c == '}') && doubled) {
      out << c;
      i += 2;
    } else if (c == '{' && i + 1 < text.size() && text[i + 1] == '}') {
      return i;
    } else {
      out << c;
      i += 1;
    }
  }
  return string_view::npos;
}

inline void write(ostringstream& out, string_view text) {
  copy_until_placeholder(out, text);
}

template <class Head, class... Tail>
void write(ostringstream& out, string_view text, const Head& head, const Tail&... tail) {
  size_t at = copy_until_placeholder(out, text);
  if (at == string_view::npos) {
    return; // more arguments than placeholders: the extras are dropped
  }
  out << head;
  write(out, text.substr(at + 2), tail...);
}

} // namespace tandem_format_detail

template <class... Args>
string format(string_view text, const Args&... args) {
  ostringstream out;
  tandem_format_detail::write(out, text, args...);
  return out.str();
}

} // namespace std
#endif // __cpp_lib_format
#endif // __cplusplus

#endif // TANDEM_MLX_COMPAT_H
