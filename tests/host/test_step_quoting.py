"""Every value a scenario gives reaches the guest's shell as one word: a backing file named with `;`,
`$()` and a space creates exactly that file and runs nothing else."""
import os
import shlex
import subprocess
from types import SimpleNamespace

from vm import device
from vm.scenario import loader, steps

NASTY = "x; touch {d}/pwned; $(touch {d}/pwned2) `touch {d}/pwned3` y.img"


def _case(tmp_path, file):
    doc = tmp_path / "quoting.toml"
    doc.write_text(f'''description = "quoting"
[devices.ubd]
target = "loop"
file = {file!r}
size = "1M"
[[steps]]
do = "add"
device = "ubd"
[[steps]]
do = "fio"
device = "ubd"
runtime = 1
[[steps]]
do = "delete"
device = "ubd"
'''.replace("'", '"'))
    return loader.load(doc)[0]


def test_a_nasty_backing_file_name_is_one_word_everywhere(tmp_path):
    file = str(tmp_path / NASTY.format(d=tmp_path))
    case = _case(tmp_path, file)
    d = case.devices["ubd"]
    assert d.file == file
    # the file-creation prefix of the add step, run for real by bash
    subprocess.run(["bash", "-c", steps._create_file(d)], check=True, cwd=tmp_path)
    assert (tmp_path / NASTY.format(d=tmp_path)).stat().st_size == 1 << 20
    assert not any((tmp_path / p).exists() for p in ("pwned", "pwned2", "pwned3"))
    # the ublk add line and the fio line carry the path as a single argument
    add = shlex.split(device.add_command(d))
    assert add[add.index("-f") + 1] == file
    ctx = SimpleNamespace(case=case, loop=0, dev_path=lambda dev: f"/dev/ublkb{dev.id}")
    fio = shlex.split(steps.fio_command(ctx, case.steps[1])[0].split(" && ", 1)[1])
    assert fio[0] == "fio" and all("pwned" not in a for a in fio)
    # the manifest kept beside the device, named after the file
    manifest, = shlex.split(steps._manifest(d))
    assert manifest == f"{steps.WORK_DIR}/{os.path.basename(file)}.sha256"
