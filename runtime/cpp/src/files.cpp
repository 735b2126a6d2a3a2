#include "files.h"

#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "manifest.h"
#include "nezha/recommender.h"

namespace nezha {
namespace {

std::deque<std::string> segments(const std::string& path) {
  std::deque<std::string> out;
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    if (end > start) out.push_back(path.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::string joined(const std::string& root, const std::vector<std::string>& parts) {
  std::string out = root;
  for (const auto& p : parts) out += "/" + p;
  return out;
}

}  // namespace

std::string artifact_root(const std::string& dir) {
  char buf[PATH_MAX];
  if (!realpath(dir.c_str(), buf)) throw Error("artifact folder " + dir + " does not exist");
  struct stat st {};
  if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) throw Error("artifact " + dir + " is not a folder");
  return buf;
}

std::string resolve_inside(const std::string& root, const std::string& rel) {
  std::deque<std::string> todo = segments(rel);
  std::vector<std::string> done;                  // resolved components below root, no links among them
  int links = 0;
  while (!todo.empty()) {
    const std::string seg = todo.front();
    todo.pop_front();
    if (seg == ".") continue;
    if (seg == "..") {
      if (done.empty()) throw Error("path '" + rel + "' leads outside the artifact folder " + root + " (through '..' in a symbolic link)");
      done.pop_back();
      continue;
    }
    done.push_back(seg);
    const std::string here = joined(root, done);
    struct stat st {};
    if (lstat(here.c_str(), &st) != 0) {         // missing: the caller reports it
      for (const auto& s : todo) done.push_back(s);
      return joined(root, done);
    }
    if (!S_ISLNK(st.st_mode)) continue;
    if (++links > 40) throw Error("path '" + rel + "' has too many symbolic links (a loop?)");
    std::vector<char> target(std::size_t(st.st_size > 0 ? st.st_size : PATH_MAX) + 1);
    const ssize_t n = readlink(here.c_str(), target.data(), target.size() - 1);
    if (n < 0) throw Error("cannot read symbolic link " + here + ": " + std::strerror(errno));
    const std::string to(target.data(), std::size_t(n));
    done.pop_back();
    if (!to.empty() && to[0] == '/') {
      if (to.compare(0, root.size() + 1, root + "/") != 0)
        throw Error("path '" + rel + "' is a symbolic link to " + to + ", outside the artifact folder " + root);
      done.clear();
      std::deque<std::string> inside = segments(to.substr(root.size() + 1));
      todo.insert(todo.begin(), inside.begin(), inside.end());
    } else {
      std::deque<std::string> relative = segments(to);
      todo.insert(todo.begin(), relative.begin(), relative.end());
    }
  }
  return joined(root, done);
}

namespace {

// sha256 of the bytes `next(buffer)` yields (how many it wrote; 0 at the end), as lower-case hex.
template <typename Next>
std::string sha256_of(Next&& next) {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL: cannot start sha256");
  std::vector<unsigned char> buf(1 << 20);
  for (std::size_t n; (n = next(buf)) > 0;)
    if (EVP_DigestUpdate(ctx.get(), buf.data(), n) != 1) throw Error("OpenSSL: sha256 update failed");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest, &len) != 1) throw Error("OpenSSL: sha256 final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

}  // namespace

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw Error("cannot open " + path + ": " + std::strerror(errno));
  const std::string out = sha256_of([&](std::vector<unsigned char>& buf) { return std::fread(buf.data(), 1, buf.size(), f.get()); });
  if (std::ferror(f.get())) throw Error("cannot read " + path);
  return out;
}

std::string sha256_hex(const std::string& bytes) {
  std::size_t at = 0;
  return sha256_of([&](std::vector<unsigned char>& buf) {
    const std::size_t n = std::min(buf.size(), bytes.size() - at);
    std::memcpy(buf.data(), bytes.data() + at, n);
    at += n;
    return n;
  });
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot open " + path + ": " + std::strerror(errno));
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) throw Error("cannot read " + path);
  return s.str();
}

void verify_files(const std::string& root, const Manifest& manifest, bool hash) {
  std::vector<std::string> problems;
  for (const auto& [rel, digest] : manifest.files) {
    try {
      const std::string path = resolve_inside(root, rel);
      struct stat st {};
      if (stat(path.c_str(), &st) != 0) {
        problems.push_back(rel + ": missing");
      } else if (!S_ISREG(st.st_mode)) {
        problems.push_back(rel + ": not a regular file");
      } else if (hash && sha256_file(path) != digest) {
        problems.push_back(rel + ": sha256 mismatch (file modified or corrupt)");
      }
    } catch (const Error& e) {
      problems.push_back(rel + ": " + e.what());
    }
  }
  if (!problems.empty()) {
    std::string msg = "artifact " + root + " failed verification:";
    for (const auto& p : problems) msg += "\n  " + p;
    throw Error(msg);
  }
}

}  // namespace nezha

namespace nezha {

void check_tree(const std::string& root, const Manifest& manifest) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(root, fs::directory_options::none, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string path = it->path().string();
    const std::string rel = path.substr(root.size() + 1);
    struct stat st {};
    if (lstat(path.c_str(), &st) != 0) throw Error(rel + ": cannot stat: " + std::strerror(errno));
    if (S_ISLNK(st.st_mode)) {
      struct stat target {};
      if (stat(resolve_inside(root, rel).c_str(), &target) == 0 && S_ISDIR(target.st_mode)) continue;   // throws if it leads outside
    } else if (S_ISDIR(st.st_mode)) {
      continue;
    } else if (!S_ISREG(st.st_mode)) {
      throw Error(rel + ": not a regular file or folder (a FIFO, socket or device has no place in an artifact)");
    }
    if (rel != "manifest.json" && !manifest.files.count(rel))
      throw Error(rel + ": a file the manifest does not list (every file of an artifact has a sha256 entry)");
  }
  if (ec) throw Error("cannot list the artifact folder " + root + ": " + ec.message());
}

namespace {

// `rel` inside `root`: a regular file of at most `max_bytes`, read whole. Throws nezha::Error naming `shown`.
std::string read_json_text(const std::string& root, const std::string& rel, const std::string& shown, std::size_t max_bytes) {
  const std::string path = resolve_inside(root, rel);
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) throw Error(shown + " not found");
  if (!S_ISREG(st.st_mode) || std::size_t(st.st_size) > max_bytes)
    throw Error(shown + " is not a regular file under " + std::to_string(std::max<std::size_t>(max_bytes >> 20, 1)) + " MB");
  return read_file(path);
}

}  // namespace

std::string read_manifest_text(const std::string& root, const std::string& shown_dir) {
  struct stat st {};
  if (stat(resolve_inside(root, "manifest.json").c_str(), &st) != 0)
    throw Error(shown_dir + "/manifest.json not found: " + shown_dir + " is not a nezha artifact folder (build one with python export/build.py)");
  return read_json_text(root, "manifest.json", shown_dir + "/manifest.json", 64u << 20);
}

void check_contract(const std::string& root, const Manifest& manifest) {
  const nlohmann::json recorded = parse_json(read_json_text(root, kContract, kContract, 1u << 20), kContract);
  bool ok = recorded.is_object() && recorded.size() == manifest.contract.size();
  for (const auto& [section, digest] : manifest.contract)
    ok = ok && recorded.contains(section) && recorded[section].is_string() && is_sha256(recorded[section].get<std::string>());
  if (!ok) throw Error(std::string(kContract) + ": expected an object of a sha256 per section layout, limits, precisions, graphs, engines, tables");
  for (const char* section : {"layout", "limits", "precisions", "graphs", "engines", "tables"}) {
    const std::string& digest = manifest.contract.at(section);
    const std::string want = recorded[section].get<std::string>();
    if (want != digest)
      throw Error(std::string("manifest.json: ") + section + ": differs from what the build recorded in " + kContract + " (sha256 " +
                  digest.substr(0, 12) + "..., recorded " + want.substr(0, 12) + "...): the manifest was edited after the build; "
                  "answers depend on it, so rebuild the artifact (python export/build.py) rather than edit it");
  }
}

}  // namespace nezha
