"""What a dataset build was made from: its resolved source folder and a stat-only fingerprint of it.

A build is cached under data_dir by its identity (`Source.key` is part of the tfds config name), so a
build made from another folder, or from this folder before a file was added, removed, replaced or
touched, is never reused. The fingerprint reads no file contents (one `stat` per file: relative
path, size, mtime), so checking a folder of thousands of images on every `data.load` stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

SOURCE_FILE = "source.json"  # written into every build folder


@dataclasses.dataclass(frozen=True)
class Source:
  path: str  # the resolved source folder
  files: int
  bytes: int
  fingerprint: str  # sha256 over the sorted (relative path, size, mtime_ns) of every file below `path`

  @property
  def key(self) -> str:
    """A short hash of path and fingerprint, for the build's config name."""
    return hashlib.sha256(f"{self.path}\n{self.fingerprint}".encode()).hexdigest()[:10]

  def describe(self) -> str:
    return f"{self.path} ({self.files} files, {self.bytes:,} bytes, fingerprint {self.fingerprint[:12]})"

  def write(self, folder: str | os.PathLike) -> None:
    record = {**dataclasses.asdict(self), "fingerprint_of": "relative path, size and mtime_ns of every file"}
    (pathlib.Path(folder) / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

  @classmethod
  def read(cls, folder: str | os.PathLike) -> Source | None:
    """The identity stored in a build folder, or None when it has none (or an unreadable one)."""
    try:
      record = json.loads((pathlib.Path(folder) / SOURCE_FILE).read_text())
      return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
    except (OSError, ValueError, KeyError, TypeError):
      return None


def fingerprint(root: pathlib.Path) -> Source:
  """The identity of the files below `root` (resolved; symlinked folders followed once, no loops)."""
  root = root.resolve()
  entries, total, seen = [], 0, set()
  for folder, dirs, files in os.walk(root, followlinks=True):
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to a folder already listed
      dirs.clear()
      continue
    seen.add((st.st_dev, st.st_ino))
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(folder, name)
      try:
        st = os.stat(path)
      except FileNotFoundError:  # a dangling symlink: the builders cannot read it either
        continue
      rel = os.path.relpath(path, root)
      entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
      total += st.st_size
  digest = hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()
  return Source(str(root), len(entries), total, digest)
