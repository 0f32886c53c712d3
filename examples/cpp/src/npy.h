// Minimal .npy (NumPy format 1.0-3.0) reading and writing of little-endian float32 C-order arrays,
// enough for the example program. Errors come back as a false return and a one-line message.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dagc::npy {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Reads `path`; refuses anything but a C-order float32 ('<f4') array, naming the dtype found.
bool Read(const std::string& path, Array* out, std::string* error);

// Writes a C-order float32 array (version 1.0 header), via a temporary file renamed into place.
bool Write(const std::string& path, const std::vector<int64_t>& shape, const float* data, std::string* error);

}  // namespace dagc::npy
