"""Glance image-import plugin `diskconv_conversion`: inspect and convert staged data
with diskconv, in place of the stock `image_conversion` (qemu-img).

Enabled in glance-api.conf with
    [image_import_opts]
    image_import_plugins = ['diskconv_conversion']
and configured under [diskconv_conversion] (README.md beside this package).

It runs on the node that holds the staged data, between staging and the store upload,
for every import method that carries data (glance-direct, web-download,
glance-download). On any refusal or error the import fails through Glance's own path:
the image goes back to `queued`, its stores are listed in `os_glance_failed_import`,
nothing is stored, and the staged data and the plugin's files are removed.
"""

import os

from glance.common import exception
from oslo_config import cfg
from oslo_log import log as logging
from taskflow.patterns import linear_flow as lf
from taskflow import task

from diskconv_glance import recover
from diskconv_glance import run

LOG = logging.getLogger(__name__)

diskconv_opts = [
    cfg.StrOpt("output_format", default="raw", choices=run.OUTPUT_FORMATS,
               help="Format the staged image is converted to before it is stored: raw "
                    "(Ceph RBD clones, Nova's raw images) or qcow2. Data already in this "
                    "format is stored as it is, after inspection."),
    cfg.StrOpt("binary", default="diskconv",
               help="The diskconv executable: a path, or a name looked up on PATH "
                    "(`pip install diskconv` puts it in the venv's bin/)."),
    cfg.StrOpt("max_virtual_size", default="16T",
               help="Largest guest disk accepted (suffixes k, M, G, T, P). A larger "
                    "virtual size fails the import: a raw output is this large on disk."),
    cfg.IntOpt("address_space_mb", default=4096, min=256,
               help="Virtual-memory limit (RLIMIT_AS) of each diskconv run, in MiB. "
                    "diskconv converts in bounded memory (under 64 MiB resident)."),
    cfg.IntOpt("inspect_cpu_time", default=30, min=1,
               help="CPU seconds (RLIMIT_CPU) the inspection of one image may take."),
    cfg.IntOpt("convert_cpu_time", default=3600, min=1,
               help="CPU seconds (RLIMIT_CPU) the conversion of one image may take."),
    cfg.IntOpt("timeout", default=7200, min=1,
               help="Wall seconds after which a diskconv run is killed and the import "
                    "fails."),
    cfg.BoolOpt("guest_properties", default=True,
                help="Set Glance's os_type, os_distro, os_version, architecture and "
                     "hw_firmware_type from the system found inside the image "
                     "(diskconv inspect --guest, without booting it), each unless the "
                     "image already has it."),
    cfg.BoolOpt("record_digests", default=True,
                help="Set diskconv_md5 and diskconv_sha512 on the image: the digests of "
                     "the converted data, computed by diskconv in the conversion. Glance's "
                     "own checksum and os_hash_value (sha512) must equal them."),
]

CONF = cfg.CONF
CONF.register_opts(diskconv_opts, group="diskconv_conversion")


def _limits():
    c = CONF.diskconv_conversion
    return run.Limits(address_space=c.address_space_mb << 20,
                      inspect_cpu_time=c.inspect_cpu_time,
                      convert_cpu_time=c.convert_cpu_time,
                      timeout=c.timeout, max_virtual_size=c.max_virtual_size)


def _vmdk_allowed_types():
    try:
        return list(CONF.image_format.vmdk_allowed_types)
    except cfg.NoSuchOptError:
        return None


class _DiskconvConvert(task.Task):
    """The flow's one task: inspect, convert, record; revert as Glance's own plugin."""

    default_provides = "file_path"

    def __init__(self, task_id, task_type, action_wrapper, stores):
        self.task_id = task_id
        self.action_wrapper = action_wrapper
        self.image_id = action_wrapper.image_id
        self.stores = stores
        self.src_path = ""
        self.tmp_path = ""
        self.dest_path = ""
        super().__init__(name="%s-Diskconv_Convert-%s" % (task_type, task_id))

    def execute(self, file_path, **kwargs):
        # Saved before any work, so that diskconv-glance-recover can end this import if
        # this node dies during it (nothing else would: the lock lasts 60 minutes).
        node = CONF.worker_self_reference_url or CONF.public_endpoint
        if node:
            with self.action_wrapper as action:
                action.set_image_extra_properties({recover.NODE_PROPERTY: node})
        with self.action_wrapper as action:
            try:
                return self._execute(action, file_path)
            except run.ImageRefused as e:
                LOG.error("diskconv_conversion: image %s: %s", self.image_id, e)
                # UploadException's text becomes the task's message.
                raise exception.UploadException(str(e))

    def _execute(self, action, file_path):
        conf = CONF.diskconv_conversion
        binary, limits = run.resolve_binary(conf.binary), _limits()
        self.src_path = file_path.split("file://")[-1]
        staging = os.path.dirname(self.src_path)
        leftovers = run.remove_residue(staging, self.image_id, keep=(self.src_path,))
        if leftovers:
            LOG.warning("diskconv_conversion: removed %s left by an earlier run",
                        ", ".join(leftovers))
        claimed = action.image_disk_format
        container = action.image_container_format
        if claimed == "iso" and container != "ova":
            return self._keep_iso(binary, limits, file_path)
        fmt = run.diskconv_format(claimed, container)
        report = run.inspect(binary, self.src_path, fmt, limits, _vmdk_allowed_types())
        action.set_image_attribute(virtual_size=report["virtual-size"])
        target = conf.output_format
        if fmt == target:
            LOG.info("diskconv_conversion: image %s is already %s; stored as it is",
                     self.image_id, target)
            self._guest_properties(action, binary, self.src_path, fmt, limits)
            return file_path
        self.tmp_path = run.temp_path(staging, self.image_id)
        self.dest_path = "%s.%s" % (self.src_path, target)
        out = run.convert(binary, self.src_path, fmt, self.tmp_path, target, limits)
        os.rename(self.tmp_path, self.dest_path)
        action.set_image_attribute(disk_format=target, container_format="bare",
                                   size=out["size"])
        if conf.record_digests:
            action.set_image_extra_properties({
                "diskconv_md5": out["digests"]["md5"],
                "diskconv_sha512": out["digests"]["sha512"],
            })
        LOG.info("diskconv_conversion: image %s %s -> %s, %d bytes, md5 %s",
                 self.image_id, fmt, target, out["size"], out["digests"]["md5"])
        self._guest_properties(action, binary, self.dest_path, target, limits)
        os.remove(self.src_path)
        return "file://%s" % self.dest_path

    def _guest_properties(self, action, binary, path, fmt, limits):
        """What system the image holds, as Glance's common properties; the user's own
        values stay."""
        if not CONF.diskconv_conversion.guest_properties:
            return
        found = run.guest_properties(binary, path, fmt, limits)
        if "" in found:
            LOG.warning("diskconv_conversion: image %s: guest not inspected: %s",
                        self.image_id, found.pop(""))
        have = action.image_extra_properties
        new = {k: v for k, v in found.items() if k not in have}
        if new:
            action.set_image_extra_properties(new)
            LOG.info("diskconv_conversion: image %s holds %s", self.image_id,
                     ", ".join("%s=%s" % kv for kv in sorted(new.items())))

    def _keep_iso(self, binary, limits, file_path):
        """An ISO is stored as it is, if no disk-image format hides in it."""
        report = run.inspect(binary, self.src_path, "raw", limits)
        LOG.info("diskconv_conversion: image %s (iso, %d bytes) stored as it is",
                 self.image_id, report.get("virtual-size", 0))
        return file_path

    def revert(self, result=None, **kwargs):
        for path in (self.tmp_path, self.dest_path, self.src_path):
            if path:
                run.remove_quietly(path)
        # As Glance's image_conversion: the stores this import was for have failed.
        with self.action_wrapper as action:
            action.set_image_attribute(status="queued")
            if self.stores:
                action.remove_importing_stores(self.stores)
                action.add_failed_stores(self.stores)


def get_flow(**kwargs):
    """The plugin's flow, as Glance's import flow asks its plugins for one.

    :param task_id: the import task's id
    :param task_type: its type
    :param action_wrapper: the api_image_import.ImportActionWrapper of the image
    :param backend: the stores the import is for
    """
    task_id = kwargs.get("task_id")
    task_type = kwargs.get("task_type")
    action_wrapper = kwargs.get("action_wrapper")
    stores = kwargs.get("backend", [])
    return lf.Flow(task_type).add(
        _DiskconvConvert(task_id, task_type, action_wrapper, stores))


def list_opts():
    """For oslo-config-generator: the plugin's options."""
    return [("diskconv_conversion", diskconv_opts)]
