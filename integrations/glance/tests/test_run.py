"""The plugin's runner (diskconv_glance.run) against the real diskconv binary and real
images made by qemu-img: no Glance needed."""

import hashlib
import os
import subprocess

import pytest

from diskconv_glance import run
from conftest import diskconv_bin, need


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    need(subprocess.run(["which", "qemu-img"], stdout=subprocess.DEVNULL).returncode == 0,
         "qemu-img (apt-get install qemu-utils)")
    d = tmp_path_factory.mktemp("img")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
        for off in (0, 5 << 20, 31 << 20):
            f.seek(off)
            f.write(os.urandom(300_000))
    out = {"raw": str(raw)}
    for fmt, opts in (("qcow2", []), ("vpc", []), ("vmdk", ["-o", "subformat=streamOptimized"])):
        p = str(d / ("disk." + fmt))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt] + opts + [str(raw), p],
                       check=True)
        out[fmt] = p
    backed = str(d / "backed.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", out["qcow2"], "-F",
                    "qcow2", backed], check=True)
    out["backed"] = backed
    out["dir"] = str(d)
    return out


def limits(**kw):
    return run.Limits(**kw)


def test_glance_names_map_to_diskconv_formats():
    assert run.diskconv_format("vhd") == "vpc"
    assert run.diskconv_format("qcow2") == "qcow2"
    assert run.diskconv_format("vmdk", "ova") == "ova"
    with pytest.raises(run.ImageRefused, match="'ploop' is not one diskconv converts"):
        run.diskconv_format("ploop")


def test_safe_image_inspects_with_its_virtual_size(images):
    rep = run.inspect(diskconv_bin(), images["qcow2"], "qcow2", limits())
    assert rep["safe"] and rep["virtual-size"] == 32 << 20
    assert rep["detected-format"] == "qcow2"


def test_claim_mismatch_is_refused_naming_both(images):
    with pytest.raises(run.ImageRefused, match="claimed raw but the data is qcow2"):
        run.inspect(diskconv_bin(), images["qcow2"], "raw", limits())


def test_backing_file_is_refused(images):
    with pytest.raises(run.ImageRefused, match="NamesOtherFiles"):
        run.inspect(diskconv_bin(), images["backed"], "qcow2", limits())


def test_virtual_size_limit_is_applied(images):
    with pytest.raises(run.ImageRefused, match="ExceedsLimit"):
        run.inspect(diskconv_bin(), images["qcow2"], "qcow2", limits(max_virtual_size=1 << 20))


def test_vmdk_create_type_must_be_allowed(images):
    run.inspect(diskconv_bin(), images["vmdk"], "vmdk", limits(), ["streamOptimized"])
    with pytest.raises(run.ImageRefused, match="'streamOptimized' is not in"):
        run.inspect(diskconv_bin(), images["vmdk"], "vmdk", limits(), ["monolithicSparse"])


def test_conversion_digests_are_those_of_the_output(images, tmp_path):
    dst = str(tmp_path / "out.raw")
    rep = run.convert(diskconv_bin(), images["qcow2"], "qcow2", dst, "raw", limits())
    data = open(dst, "rb").read()
    assert data == open(images["raw"], "rb").read()
    assert rep["size"] == len(data)
    assert rep["digests"]["md5"] == hashlib.md5(data).hexdigest()
    assert rep["digests"]["sha512"] == hashlib.sha512(data).hexdigest()


def test_failed_conversion_leaves_no_output(images, tmp_path):
    dst = str(tmp_path / "out.raw")
    with pytest.raises(run.ImageRefused, match="could not convert"):
        run.convert(diskconv_bin(), images["raw"], "qcow2", dst, "raw", limits())
    assert not os.path.exists(dst)


def test_address_space_limit_stops_diskconv(images, tmp_path):
    # 16 MiB of address space cannot hold the binary and its threads: the run fails
    # with an error, never a half-written output.
    dst = str(tmp_path / "out.raw")
    with pytest.raises(run.ImageRefused):
        run.convert(diskconv_bin(), images["qcow2"], "qcow2", dst, "raw",
                    limits(address_space=16 << 20))
    assert not os.path.exists(dst)


def test_timeout_kills_the_run():
    # The hang guard itself, on a process that never ends by itself.
    with pytest.raises(run.ImageRefused, match="ran past 1 s"):
        run._run(["sleep", "30"], 60, limits(timeout=1))


def test_cpu_limit_stops_the_run():
    with pytest.raises(run.ImageRefused, match="CPU-time limit"):
        run._run(["sh", "-c", "while :; do :; done"], 1, limits(timeout=60))


def test_residue_of_a_killed_run_is_found_by_image_id(tmp_path):
    image = "0b6e9c5e-7a8e-4a1e-9d54-7d0f2d3c0a11"
    names = [image, image + run.TEMP_MARK + "123", image + ".raw", "other" + run.TEMP_MARK + "1"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = run.remove_residue(str(tmp_path), image, keep=(str(tmp_path / image),))
    assert sorted(removed) == sorted(names[1:3])
    assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[3]])


def test_binary_by_name_is_found_beside_python(tmp_path, monkeypatch):
    # Under uWSGI the venv's bin/ is seldom on PATH: a bare name is looked up there too.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(run.sys, "prefix", str(tmp_path))
    with pytest.raises(run.ImageRefused, match="neither on PATH nor in"):
        run.resolve_binary("diskconv")
    (tmp_path / "bin").mkdir()
    os.symlink(diskconv_bin(), str(tmp_path / "bin" / "diskconv"))
    assert run.resolve_binary("diskconv") == str(tmp_path / "bin" / "diskconv")
    assert run.resolve_binary("/opt/x/diskconv") == "/opt/x/diskconv"
