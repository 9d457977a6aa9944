// Data roots: which directories a job may read (issue 6, "Security").
//
// A coordinator or worker started with one or more `--data-root DIR` only accepts a job whose
// data.dir lies inside one of them. "Inside" is decided twice, and both must hold:
//   1. lexically: path.lexically_normal() starts with root.lexically_normal() component by
//      component ("/data/x/../y" is "/data/y"; "/data/../etc" is "/etc"; "/data2" is not under
//      "/data");
//   2. physically: std::filesystem::weakly_canonical(path) (symlinks of the existing prefix
//      resolved, `..` after a symlink taken as the OS would) starts with weakly_canonical(root),
//      so a symlink under a root that points outside it is refused, and a root that is itself a
//      symlink still works.
// A path may name something that does not exist (yet): only its existing prefix is resolved.
//
// Relative paths are refused: the caller decides what they are relative to and passes an
// absolute path (mat-worker resolves against its working directory, which is what it would open;
// the coordinator cannot know a worker's working directory and refuses them).
//
// Thread-safety: pure functions of their arguments and the file system; safe from any thread.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace mat::common {

// True when `path` equals `root` or lies below it, comparing the lexically normal forms
// component by component (a trailing '/' is ignored). Both should be absolute; no file system
// access.
bool IsLexicallyUnder(const std::string& path, const std::string& root);

// OK when `roots` is empty (no restriction) or `path` is inside one of `roots` (rules above).
// INVALID_ARGUMENT naming the path and the roots when `path` is empty, relative, or outside
// every root ("'/etc/passwd' is not under a data root (/data, /scratch)"); also when a root is
// empty or relative (a configuration error, named).
absl::Status CheckUnderRoots(const std::string& path, const std::vector<std::string>& roots);

}  // namespace mat::common
