"""atomic_write_bytes: the rename leaves the same file a plain open() would, with no temporary files behind."""
import os
import stat

from lmstack import config
from lmstack.config import atomic_write_bytes, atomic_write_text


def test_new_file_gets_the_umask_default_not_mkstemps_private_mode(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"xyz")
    old = os.umask(config._UMASK)  # the umask config read at import, for the plain open() to compare with
    try:
        with open(tmp_path / "b.bin", "wb") as f:
            f.write(b"xyz")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~config._UMASK, oct(mode)
    if not config._UMASK & 0o044:  # the usual 022 or 002: readable by others, where mkstemp alone gives 0600
        assert mode & 0o044
    assert (tmp_path / "a.bin").read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary file left behind


def test_rewrite_keeps_the_replaced_files_mode(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    atomic_write_text(path, '{"a": 1}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text() == '{"a": 1}'
