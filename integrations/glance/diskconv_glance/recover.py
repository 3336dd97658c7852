"""diskconv-glance-recover: fail, as Glance's own revert would, the imports a glance-api
node was running when it died.

A killed glance-api cannot revert its import: the image stays `importing`, locked by a
task that no process runs, for Glance's 60-minute lock expiry. The plugin records the
node on the image (`diskconv_import_node`, its worker_self_reference_url) before it
starts work. This tool, run with that node's glance-api.conf before the node's
glance-api starts again (an ExecStartPre), or from another node with `--node URL` for a
node that is gone, finds those imports and ends them: the task fails with a message
naming the node, the image goes back to `queued` with the import's stores in
`os_glance_failed_import`, the import lock is dropped, and (on the node itself) the
staged data and the plugin's scratch files are removed. The user stages and imports
again, through any node.
"""

import argparse
import os
import sys
import urllib.request

NODE_PROPERTY = "diskconv_import_node"


def _alive(url):
    """Whether a glance-api answers at url."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/versions", timeout=5):
            return True
    except OSError as e:
        # An HTTP error status is an answer too: something is serving there.
        return hasattr(e, "code")


def _staging_dir(conf):
    try:
        d = conf.os_glance_staging_store.filesystem_store_datadir
    except Exception:
        d = None
    return d


def recover(conf, node, staging_dir):
    """End every import of `node`'s left locked; the image ids ended."""
    from glance.async_.flows import api_image_import
    from glance.common import exception
    from glance import context
    from glance import gateway

    ctx = context.get_admin_context()
    gw = gateway.Gateway()
    image_repo, task_repo = gw.get_repo(ctx), gw.get_task_repo(ctx)
    ended = []
    for image in image_repo.list(filters={"status": "importing"}):
        props = image.extra_properties
        if props.get(NODE_PROPERTY) != node:
            continue
        task_id = props.get("os_glance_import_task")
        stores = []
        if task_id:
            try:
                task = task_repo.get(task_id)
            except exception.NotFound:
                task = None
            if task is not None:
                stores = task.task_input.get("backend") or []
                if task.status in ("pending", "processing"):
                    task.fail("glance-api at %s stopped during this import; ended by "
                              "diskconv-glance-recover: stage and import again" % node)
                    task_repo.save(task)
        actions = api_image_import._ImportActions(image)
        actions.set_image_attribute(status="queued")
        stores = [s for s in stores if s]
        if stores:
            actions.remove_importing_stores(stores)
            actions.add_failed_stores(stores)
        actions.pop_extra_property(NODE_PROPERTY)
        image_repo.save(image, from_state="importing")
        if task_id:
            try:
                image_repo.delete_property_atomic(image, "os_glance_import_task", task_id)
            except exception.NotFound:
                pass
        if staging_dir:
            _remove_staged(staging_dir, image.image_id)
        ended.append(image.image_id)
    return ended


def sweep_staging(staging_dir, own):
    """Remove from this node's staging area every file no upload waits on; their names.

    Run while this node's glance-api is down, so no import of its is running: a file
    stays only if its image is `uploading` with its data staged here (it awaits an
    import call). Glance's own start-up sweep keeps every file of an image that exists,
    which after a crash leaves the data of an import that another node then redid.
    """
    from glance import context
    from glance.common import exception
    from glance import gateway

    repo = gateway.Gateway().get_repo(context.get_admin_context())
    removed = []
    try:
        names = sorted(os.listdir(staging_dir))
    except FileNotFoundError:
        return removed
    for name in names:
        image_id = name.split(".", 1)[0]
        try:
            image = repo.get(image_id)
            keep = (image.status == "uploading" and name == image_id and
                    image.extra_properties.get("os_glance_stage_host") in (own, None))
        except exception.NotFound:
            keep = False
        except Exception:
            keep = True   # not an image's file (a name that is no image id): not ours
        if not keep:
            try:
                os.remove(os.path.join(staging_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _remove_staged(staging_dir, image_id):
    try:
        names = os.listdir(staging_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name == image_id or name.startswith(image_id + "."):
            try:
                os.remove(os.path.join(staging_dir, name))
            except FileNotFoundError:
                pass


def main(argv=None):
    """The command line: diskconv-glance-recover --config-file glance-api.conf [--node URL]."""
    p = argparse.ArgumentParser(prog="diskconv-glance-recover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", action="append", required=True,
                   help="glance-api.conf (repeatable, as for glance-api)")
    p.add_argument("--node", help="the dead node's worker_self_reference_url (default: "
                                  "this node's, from the config: run before it starts)")
    p.add_argument("--force", action="store_true",
                   help="end the imports even though a glance-api answers at --node")
    a = p.parse_args(argv)

    # Every Glance module first: some register options, which must precede parsing.
    from glance.async_.flows import api_image_import  # noqa: F401
    from glance.common import config
    from glance import gateway  # noqa: F401
    import glance_store
    from oslo_config import cfg

    conf = cfg.CONF
    conf(["--config-file=%s" % f for f in a.config_file], project="glance",
         prog="glance-api")
    config.set_config_defaults()
    glance_store.register_opts(conf)
    glance_store.register_store_opts(conf, reserved_stores={
        "os_glance_staging_store": "file", "os_glance_tasks_store": "file"})
    own = conf.worker_self_reference_url or conf.public_endpoint
    node = a.node or own
    if not node:
        p.error("no --node and no worker_self_reference_url in the config")
    if _alive(node) and not a.force:
        print("diskconv-glance-recover: a glance-api answers at %s: its imports may be "
              "running; stop it first (or --force)" % node, file=sys.stderr)
        return 1
    staging = _staging_dir(conf) if node == own else None
    ended = recover(conf, node, staging)
    for image_id in ended:
        print("ended the import of image %s (was running on %s)" % (image_id, node))
    if not ended:
        print("no import of %s was left running" % node)
    if staging:
        for name in sweep_staging(staging, own):
            print("removed %s from the staging area" % name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
