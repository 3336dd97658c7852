"""Run the diskconv binary on a staged image: inspect it, then convert it.

Nothing here imports Glance, so it is tested on its own (tests/test_run.py) against the
real binary. The plugin (plugin.py) is the thin part that talks to Glance's import flow.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

# Glance's disk_format names that diskconv reads, and diskconv's name for each (qemu's
# "vpc" is Glance's "vhd"). Everything else (iso, ami, ploop, ...) is refused by name.
GLANCE_TO_DISKCONV = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "vdi": "vdi",
}

# What the plugin may write: the formats Nova and Cinder consume from a store.
OUTPUT_FORMATS = ("raw", "qcow2")

# Suffix of the plugin's own scratch files in the staging directory: "<image id>" is
# the name Glance's staging cleaner understands ("<uuid>.<anything>" is residue of that
# image), so a crash's leftovers are found by image id, here and by Glance.
TEMP_MARK = ".diskconv-tmp-"


class ImageRefused(Exception):
    """The image is unsafe, not what was claimed, or could not be read or converted.

    Its text is what the user sees as the import task's message.
    """


class Limits:
    """Resource limits of each diskconv run, as Glance limits qemu-img.

    address_space: bytes of virtual memory (RLIMIT_AS); cpu_time: seconds of CPU
    (RLIMIT_CPU) for the inspection; timeout: wall seconds of any one run;
    max_virtual_size: the largest guest disk accepted, in bytes.
    """

    def __init__(self, address_space=4 << 30, inspect_cpu_time=30,
                 convert_cpu_time=3600, timeout=7200,
                 max_virtual_size=1 << 40):
        self.address_space = address_space
        self.inspect_cpu_time = inspect_cpu_time
        self.convert_cpu_time = convert_cpu_time
        self.timeout = timeout
        self.max_virtual_size = max_virtual_size


def resolve_binary(name):
    """The diskconv executable for a configured `binary`: a path as it is; a bare name
    looked up on PATH, then in the bin/ of the Python environment Glance runs in, where
    `pip install diskconv` puts it (a glance-api under uWSGI or systemd seldom has its
    venv's bin/ on PATH)."""
    if os.sep in name:
        return name
    found = shutil.which(name)
    if found:
        return found
    beside = os.path.join(sys.prefix, "bin", name)
    if os.access(beside, os.X_OK):
        return beside
    raise ImageRefused("the diskconv binary %r is neither on PATH nor in %s "
                       "([diskconv_conversion] binary; pip install diskconv)"
                       % (name, os.path.join(sys.prefix, "bin")))


def _limited(cmd, cpu_time, limits):
    """The command under util-linux's prlimit and setpriv.

    prlimit sets the address-space and CPU limits; setpriv's --pdeathsig kills diskconv
    when the thread that started it dies (a killed glance-api worker), so no conversion
    runs on, writing into the staging area, for an import nobody is waiting for. Both are
    exec'd programs: a preexec_fn would run Python in a forked child of a threaded server.
    """
    return ["setpriv", "--pdeathsig", "KILL", "--",
            "prlimit", "--as=%d" % limits.address_space,
            # SIGXCPU at the soft limit names the cause; SIGKILL a second later.
            "--cpu=%d:%d" % (cpu_time, cpu_time + 1),
            "--"] + list(cmd)


def _run(cmd, cpu_time, limits):
    """Run a limited command; (exit status, stdout, stderr). A hang is killed."""
    proc = subprocess.Popen(_limited(cmd, cpu_time, limits), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ImageRefused("diskconv ran past %d s on this image and was stopped"
                           % limits.timeout)
    if proc.returncode < 0:
        sig = -proc.returncode
        why = {signal.SIGXCPU: "its CPU-time limit", signal.SIGKILL: "a kill"}.get(
            sig, "signal %d" % sig)
        raise ImageRefused("diskconv was stopped by %s" % why)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _first_error(err):
    """The error line diskconv printed (the last non-empty line of stderr)."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def diskconv_format(disk_format, container_format=None):
    """diskconv's -f for an image Glance calls (disk_format, container_format).

    An OVA container is read as one ("-f ova": its first disk, whatever its format).
    """
    if container_format == "ova":
        return "ova"
    try:
        return GLANCE_TO_DISKCONV[disk_format]
    except KeyError:
        raise ImageRefused("disk_format %r is not one diskconv converts (%s)"
                           % (disk_format, ", ".join(sorted(GLANCE_TO_DISKCONV))))


def inspect(binary, path, fmt, limits, allowed_vmdk_types=None):
    """Inspect the staged file claimed to be `fmt`; its report (a dict) when safe.

    Raises ImageRefused naming every finding when diskconv calls it unsafe (exit 2),
    and with diskconv's error when it cannot read it (exit 1).
    """
    cmd = [binary, "inspect", "--output=json", "-f", fmt,
           "--max-virtual-size", str(limits.max_virtual_size), path]
    status, out, err = _run(cmd, limits.inspect_cpu_time, limits)
    if status not in (0, 2):
        raise ImageRefused("diskconv could not read the image as %s: %s"
                           % (fmt, _first_error(err)))
    try:
        report = json.loads(out)
    except ValueError:
        raise ImageRefused("diskconv inspect printed no report: %s" % _first_error(err))
    if status == 2 or not report.get("safe"):
        raise ImageRefused("image refused: " + describe_findings(report))
    if fmt == "vmdk" and allowed_vmdk_types is not None:
        status, out, err = _run([binary, "info", "-f", "vmdk", "--output=json", path],
                                limits.inspect_cpu_time, limits)
        if status != 0:
            raise ImageRefused("diskconv info could not read the vmdk: %s"
                               % _first_error(err))
        data = json.loads(out).get("format-specific", {}).get("data", {})
        subformat = data.get("create-type")
        if subformat not in allowed_vmdk_types:
            raise ImageRefused("vmdk create-type %r is not in [image_format] "
                               "vmdk_allowed_types (%s)"
                               % (subformat, ", ".join(allowed_vmdk_types)))
    return report


def describe_findings(report):
    """One line for an unsafe inspection: the claim, what was found, each finding."""
    parts = []
    claimed, detected = report.get("claimed-format"), report.get("detected-format")
    if claimed and detected and claimed != detected:
        parts.append("claimed %s but the data is %s" % (claimed, detected))
    elif claimed and not detected:
        parts.append("claimed %s but the data is %s" % (
            claimed, report.get("unsupported-format") or "of no single known format"))
    for f in report.get("findings", []):
        if f.get("hazard", True):
            parts.append("%s: %s" % (f.get("kind", "finding"), f.get("detail", "")))
    return "; ".join(parts) or "unsafe"


def convert(binary, src, src_fmt, dst, out_fmt, limits):
    """Convert src to dst (out_fmt); the report diskconv printed (format, virtual-size,
    size, digests md5 and sha512 of dst).

    diskconv writes dst whole or not at all; a failure raises ImageRefused with its
    error and leaves no dst.
    """
    cmd = [binary, "convert", "-f", src_fmt, "-O", out_fmt, "--digest", "md5,sha512",
           "--output=json", src, dst]
    try:
        status, out, err = _run(cmd, limits.convert_cpu_time, limits)
    except ImageRefused:
        remove_quietly(dst)
        raise
    if status != 0:
        remove_quietly(dst)
        raise ImageRefused("diskconv could not convert the image to %s: %s"
                           % (out_fmt, _first_error(err)))
    return json.loads(out)


def guest_properties(binary, path, fmt, limits):
    """Glance's os_type, os_distro, os_version, architecture and hw_firmware_type of the
    system inside the image (`diskconv inspect --guest`, read without booting it); {}
    when no system is recognised. An error reading the guest is not the image's fault:
    it is returned as {"": message} for the plugin to log, never raised."""
    cmd = [binary, "inspect", "--guest", "--output=glance-properties", "-f", fmt, path]
    try:
        status, out, err = _run(cmd, limits.inspect_cpu_time, limits)
    except ImageRefused as e:
        return {"": str(e)}
    if status != 0:
        return {"": _first_error(err)}
    try:
        props = json.loads(out)
    except ValueError:
        return {"": "no JSON from diskconv inspect --guest"}
    return {k: str(v) for k, v in props.items() if isinstance(k, str) and k}


def remove_quietly(path):
    """Remove a file that may not exist."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def temp_path(staging_dir, image_id):
    """The conversion's scratch output, named by image id and this process."""
    return os.path.join(staging_dir, "%s%s%d" % (image_id, TEMP_MARK, os.getpid()))


def remove_residue(staging_dir, image_id, keep=()):
    """Remove the plugin's files for this image left by an earlier, killed run.

    Returns the names removed. Glance's own staged file ("<image id>") and anything in
    `keep` stay.
    """
    removed = []
    try:
        names = os.listdir(staging_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(str(image_id) + "."):
            continue
        path = os.path.join(staging_dir, name)
        if path in keep:
            continue
        if TEMP_MARK in name or name.rsplit(".", 1)[-1] in OUTPUT_FORMATS:
            remove_quietly(path)
            removed.append(name)
    return removed
