#include "npy.h"

#include <cstring>

#include "nezha/recommender.h"

namespace nezha {
namespace {

// The header is a Python dict literal as numpy writes it: {'descr': '<i8', 'fortran_order': False,
// 'shape': (3, 4), } padded with spaces and a newline. A tiny cursor parser for exactly that grammar.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  void parse(std::string& descr, bool& fortran, std::vector<std::int64_t>& shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    expect('{');
    while (true) {
      skip();
      if (peek() == '}') { ++i_; break; }
      const std::string key = quoted();
      expect(':');
      if (key == "descr" && !have_descr) {
        descr = quoted();
        have_descr = true;
      } else if (key == "fortran_order" && !have_fortran) {
        skip();
        if (s_.compare(i_, 5, "False") == 0) { fortran = false; i_ += 5; }
        else if (s_.compare(i_, 4, "True") == 0) { fortran = true; i_ += 4; }
        else fail("fortran_order must be True or False");
        have_fortran = true;
      } else if (key == "shape" && !have_shape) {
        expect('(');
        while (true) {
          skip();
          if (peek() == ')') { ++i_; break; }
          shape.push_back(integer());
          skip();
          if (peek() == ',') ++i_;
          else if (peek() != ')') fail("malformed shape tuple");
        }
        have_shape = true;
      } else {
        fail("unexpected or repeated key '" + key + "'");
      }
      skip();
      if (peek() == ',') ++i_;
      else if (peek() != '}') fail("expected ',' or '}'");
    }
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n')) ++i_;
    if (i_ != s_.size()) fail("unexpected text after the header dict");
    if (!have_descr || !have_fortran || !have_shape) fail("the header needs descr, fortran_order and shape");
  }

 private:
  [[noreturn]] void fail(const std::string& why) const { throw Error(source_ + ": malformed .npy header: " + why); }
  void skip() { while (i_ < s_.size() && s_[i_] == ' ') ++i_; }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void expect(char c) {
    skip();
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string quoted() {
    skip();
    const char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    const std::size_t end = s_.find(q, i_ + 1);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s_.substr(i_ + 1, end - i_ - 1);
    i_ = end + 1;
    return out;
  }
  std::int64_t integer() {
    std::size_t start = i_;
    std::int64_t v = 0;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      if (v > (std::int64_t{1} << 50)) fail("dimension too large");
      v = v * 10 + (s_[i_++] - '0');
    }
    if (i_ == start) fail("expected a dimension");
    if (peek() == 'L') ++i_;               // Python 2 long suffix, as old numpy wrote
    return v;
  }
  const std::string& s_;
  const std::string& source_;
  std::size_t i_ = 0;
};

}  // namespace

NpyArray parse_npy(const std::string& bytes, const std::string& source) {
  static const char magic[] = "\x93NUMPY";
  if (bytes.size() < 10 || std::memcmp(bytes.data(), magic, 6) != 0) throw Error(source + ": not a .npy file (bad magic)");
  const unsigned major = static_cast<unsigned char>(bytes[6]), minor = static_cast<unsigned char>(bytes[7]);
  std::size_t header_len, start;
  if (major == 1 && minor == 0) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    start = 10;
  } else if (major == 2 && minor == 0) {
    if (bytes.size() < 12) throw Error(source + ": truncated .npy header");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    start = 12;
  } else {
    throw Error(source + ": .npy format " + std::to_string(major) + "." + std::to_string(minor) + "; this reader reads 1.0 and 2.0");
  }
  if (bytes.size() < start + header_len) throw Error(source + ": truncated .npy header");
  std::string descr;
  bool fortran = true;
  NpyArray a;
  HeaderParser(bytes.substr(start, header_len), source).parse(descr, fortran, a.shape);
  if (descr == "<i8") a.dtype = "int64";
  else if (descr == "<u8") a.dtype = "uint64";
  else throw Error(source + ": dtype '" + descr + "'; tables are little-endian int64 ('<i8') or uint64 ('<u8')");
  if (fortran) throw Error(source + ": Fortran-order array; tables are C order");
  std::size_t count = 1;
  for (std::int64_t d : a.shape) {
    if (d != 0 && count > (std::size_t{1} << 40) / std::size_t(d)) throw Error(source + ": shape too large");
    count *= std::size_t(d);
  }
  const std::size_t data_start = start + header_len;
  if (bytes.size() - data_start != count * 8)
    throw Error(source + ": " + std::to_string(bytes.size() - data_start) + " data bytes, the header's shape needs " + std::to_string(count * 8));
  a.data.resize(count);
  if (count) std::memcpy(a.data.data(), bytes.data() + data_start, count * 8);
  return a;
}

}  // namespace nezha
