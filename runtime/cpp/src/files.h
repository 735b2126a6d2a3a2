// The artifact's files: paths resolved inside the folder (symbolic links followed one component at a
// time, refused before anything outside is touched), sha256 (OpenSSL's libcrypto) and reading.
#pragma once

#include <string>

namespace nezha {

struct Manifest;

// `root` made absolute and free of symbolic links (realpath). Throws nezha::Error if it is no folder.
std::string artifact_root(const std::string& dir);

// The absolute path of `rel` (checked lexically already) inside `root` (from artifact_root), following
// symbolic links component by component; a link that leads outside the folder is refused before it is
// followed. A missing file resolves without error (the caller reports it). Throws nezha::Error.
std::string resolve_inside(const std::string& root, const std::string& rel);

// Lower-case hex sha256 of a file's bytes. Throws nezha::Error if it cannot be read.
std::string sha256_file(const std::string& path);

// Lower-case hex sha256 of `bytes`.
std::string sha256_hex(const std::string& bytes);

// True for 64 lower-case hex digits.
bool is_sha256(const std::string& s);

// The whole file. Throws nezha::Error naming `path`.
std::string read_file(const std::string& path);

// Every file listed in the manifest resolves inside the folder and exists; with `hash`, its sha256
// matches. Reports every problem in one nezha::Error.
void verify_files(const std::string& root, const Manifest& manifest, bool hash);

// Every entry under `root` is a folder, a regular file or a symbolic link that stays inside, and every file
// but manifest.json is listed in the manifest's `files` (so it is hashed): ONNX Runtime opens files the
// manifest does not name (a graph's external data), so no unlisted file, no link leading out and no FIFO
// or device may stand in the folder. Links are read, never followed, to check this. Throws nezha::Error.
void check_tree(const std::string& root, const Manifest& manifest);

// manifest.json of the folder `root`: inside it, a regular file of at most 64 MiB. Throws nezha::Error.
std::string read_manifest_text(const std::string& root, const std::string& shown_dir);

// contract.json of the folder against the manifest's own section digests (Manifest::contract): an edited
// section is refused by name. Read whether or not files are hashed. Throws nezha::Error.
void check_contract(const std::string& root, const Manifest& manifest);

}  // namespace nezha
