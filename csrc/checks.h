// Argument checks with readable messages. A failed check throws std::invalid_argument, which pybind11
// turns into a Python ValueError; the Python wrappers validate first, so these are the last line of defence.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace vlmfast {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace vlmfast

#define VLMFAST_CHECK(cond, ...)                                                      \
  do {                                                                                \
    if (!(cond)) throw std::invalid_argument(::vlmfast::concat("vlmfast._C: ", __VA_ARGS__)); \
  } while (0)
