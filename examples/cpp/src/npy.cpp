#include "npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <regex>

namespace dagc::npy {

namespace {

bool Fail(std::string* error, const std::string& message) {
  *error = message;
  return false;
}

// Value of `key` in the header's Python dict literal, e.g. 'descr': '<f4' -> "'<f4'".
bool Field(const std::string& header, const std::string& key, std::string* value) {
  std::smatch m;
  std::regex re("['\"]" + key + "['\"]\\s*:\\s*(\\([^)]*\\)|'[^']*'|\"[^\"]*\"|True|False)");
  if (!std::regex_search(header, m, re)) return false;
  *value = m[1].str();
  return true;
}

}  // namespace

bool Read(const std::string& path, Array* out, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Fail(error, "cannot read " + path + " (" + std::strerror(errno) + ")");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string what = path + " is not a .npy file";
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) return Fail(error, what + " (no NUMPY magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return Fail(error, what + " (truncated header)");
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    offset = 12;
  } else {
    return Fail(error, what + " (unknown format version " + std::to_string(major) + ")");
  }
  if (bytes.size() < offset + header_len) return Fail(error, what + " (truncated header)");
  const std::string header = bytes.substr(offset, header_len);
  std::string descr, fortran, shape;
  if (!Field(header, "descr", &descr) || !Field(header, "fortran_order", &fortran) || !Field(header, "shape", &shape)) {
    return Fail(error, what + " (unreadable header)");
  }
  descr = descr.substr(1, descr.size() - 2);
  if (descr != "<f4" && descr != "=f4") {
    return Fail(error, path + " holds dtype '" + descr + "', not float32 ('<f4'); save the preprocessed batch with "
                "numpy.save(path, x.astype(numpy.float32))");
  }
  if (fortran != "False") {
    return Fail(error, path + " is in Fortran order; save a C-order array (numpy.ascontiguousarray)");
  }
  out->shape.clear();
  int64_t count = 1;
  std::regex num("\\d+");
  for (auto it = std::sregex_iterator(shape.begin(), shape.end(), num); it != std::sregex_iterator(); ++it) {
    out->shape.push_back(std::stoll(it->str()));
    count *= out->shape.back();
  }
  const size_t need = static_cast<size_t>(count) * sizeof(float);
  if (bytes.size() - offset - header_len != need) {
    return Fail(error, path + " is truncated or has trailing data (" + std::to_string(bytes.size() - offset - header_len) +
                " data bytes, the header's shape needs " + std::to_string(need) + ")");
  }
  out->data.resize(static_cast<size_t>(count));
  if (need) std::memcpy(out->data.data(), bytes.data() + offset + header_len, need);
  return true;
}

bool Write(const std::string& path, const std::vector<int64_t>& shape, const float* data, std::string* error) {
  std::string dims;
  int64_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    count *= shape[i];
  }
  if (shape.size() == 1) dims += ",";  // Python's one-element tuple
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64 bytes.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return Fail(error, "cannot write " + tmp + " (" + std::strerror(errno) + ")");
    const char preamble[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    f.write(preamble, 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    f.write(len_bytes, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
    f.flush();
    if (!f) return Fail(error, "cannot write " + tmp + " (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Fail(error, "cannot rename " + tmp + " to " + path + " (" + std::strerror(errno) + ")");
  }
  return true;
}

}  // namespace dagc::npy
