"""One variant of the driver, built and packed for a guest: the tree's ublk_drv.c copied into the
variant's own folder, the mutant applied to the copy (none for the control), compiled as an external
module against the tree's finished build (seconds: only ublk_drv.c compiles), and put in a copy of
the tree's initramfs. The tree and its build are only read."""
from pathlib import Path

from . import kernel_tree
from .image import Image
from .kernel_tree import DRIVER_SOURCE
from .mutants_patch import Mutant, apply

KBUILD = "obj-m := ublk_drv.o\n"
# modpost marks only modules built inside the tree as such; this one is the tree's own driver, built
# apart so that the tree's build stays as it is. Without the mark the kernel would taint itself
# "O" (out-of-tree module) and the variant would differ from the control in more than its patch.
IN_TREE_MARK = '\nMODULE_INFO(intree, "Y");\n'


def source(tree: Path, mutant: Mutant, work: Path) -> Path:
    """work/src/drivers/block with the (mutated) driver and its Kbuild; returns that folder."""
    src = work / "src"
    if mutant is None:
        (src / DRIVER_SOURCE).parent.mkdir(parents=True, exist_ok=True)
        (src / DRIVER_SOURCE).write_bytes((tree / DRIVER_SOURCE).read_bytes())
    else:
        apply(mutant, tree, src)
    with open(src / DRIVER_SOURCE, "a") as f:
        f.write(IN_TREE_MARK)
    folder = (src / DRIVER_SOURCE).parent
    (folder / "Kbuild").write_text(KBUILD)
    return folder


def build(tree: Path, mutant: Mutant, work: Path, tree_image: Image, debug: bool, log) -> Image:
    """The guest image of one variant (SetupError with the compiler's words if it does not build).
    work/image is disposable: remove it once the variant has run."""
    folder = source(tree, mutant, work)
    ko = kernel_tree.build_module(tree, folder, debug=debug, log=log)
    return kernel_tree.with_driver_module(tree_image, ko, work / "image",
                                          mutant.name if mutant else "control")


def build_log(work: Path) -> Path:
    return work / "src" / Path(DRIVER_SOURCE).parent / "build.log"
