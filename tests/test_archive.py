"""The local MME's extraction of a model archive: one pass, safe member by member, one model folder."""

import io
import tarfile
import zlib

import pytest

from deploy.aws import tarball
from deploy.local.mme import archive


def tar_gz(path, entries, level=0):
    """entries: (name, bytes) for files, (name, "->target") for symlinks, (name, [tarfile type]) otherwise."""
    with tarfile.open(path, "w:gz", compresslevel=level) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                (info.type,) = content
                tar.addfile(info)
    return path


def test_a_packed_model_folder_extracts_with_its_links(tmp_path):
    model = tmp_path / "src" / "sd_x"
    (model / "sd_env" / "lib").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "sd_x"')
    (model / "sd_env" / "lib" / "libpython3.so.1.0").write_bytes(b"\x7fELF" * 1000)
    (model / "sd_env" / "lib64").symlink_to("lib")  # relative links inside an environment are normal
    packed = tarball.write(tmp_path / "sd_x.tar.gz", [(model, "sd_x")], "test", compresslevel=0)
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(packed.read_bytes())  # a valid gzip stream

    assert archive.extract(packed, tmp_path / "out") == "sd_x"
    out = tmp_path / "out" / "sd_x"
    assert (out / "config.pbtxt").read_text() == 'name: "sd_x"'
    assert (out / "sd_env" / "lib64").is_symlink()
    assert (out / "sd_env" / "lib64" / "libpython3.so.1.0").read_bytes() == b"\x7fELF" * 1000


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("m/config.pbtxt", b"x"), ("m/../../escaped.txt", b"boom")], "is outside the destination"),
        ([("m/config.pbtxt", b"x"), ("m/link", "->../../.."), ("m/link/escaped.txt", b"boom")], "outside"),
        ([("m/config.pbtxt", b"x"), ("m/abs", "->/etc")], "is a link to an absolute path"),
        ([("m/config.pbtxt", b"x"), ("m/dev", [tarfile.CHRTYPE])], "is a special file"),
        ([("m/config.pbtxt", b"x"), ("other/config.pbtxt", b"x")], "one top-level model folder"),
        ([("m/model.py", b"x")], "has no config.pbtxt"),
        ([], "is empty"),
    ],
)
def test_unsafe_or_malformed_archives_are_refused_and_leave_nothing(tmp_path, entries, message):
    bad = tar_gz(tmp_path / "bad.tar.gz", entries)
    dest = tmp_path / "root" / "out"
    with pytest.raises(archive.ArchiveError, match=message):
        archive.extract(bad, dest)
    assert not dest.exists()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "root" / "escaped.txt").exists()


def test_a_truncated_archive_is_refused(tmp_path):
    good = tar_gz(tmp_path / "good.tar.gz", [("m/config.pbtxt", b"x" * 100_000)], level=1)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(archive.ArchiveError, match="cannot extract cut.tar.gz"):
        archive.extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
