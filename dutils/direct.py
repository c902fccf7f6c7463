"""d-pull --share of an image whose tree the store holds complete: the folder made by the pipeline's own steps, in its
order, without doit, whose start-up would cost the folder more than anything but its links."""

from .pipeline import Pull, finish
from .share import StoreTree


def share_directly(pull: Pull) -> bool:
    """Resolve, make_rootfs, write_config, as the tasks do. False when the manifest's tree is not complete (or the
    folder is): the tasks then go on from that manifest (Pull.settled), with the folder held still."""
    try:
        pull.resolve()  # holds the folder, and the cache, until write_config (or finish)
        image = pull.image
        tree = image.layers and StoreTree(pull.options.cache, image.diff_ids, [layer.digest for layer in image.layers])
        if not (tree and tree.complete()) or pull.is_complete():
            return False
        if not pull.all_applied():  # as the pipeline's task: a folder holding its layers keeps its rootfs and overlay
            tree.make_rootfs(pull.folder, pull.log, pull.options.progress.note)
        pull.write_config()
    except BaseException:
        finish([pull])  # a pull that recorded nothing leaves no trace (folder.claimed); d-pull says what failed
        raise
    finish([pull])
    return True
