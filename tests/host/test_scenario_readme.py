"""scenarios/README.md says what the loader accepts: the device table is generated from the device
vocabulary, and the step table names every step kind of the schema with its keys, none extra."""
import re

from vm.scenario import reference, schema

TEXT = reference.README.read_text()


def test_device_table_is_the_generated_one():
    got = TEXT.split(reference.BEGIN, 1)[1].split(reference.END, 1)[0].strip()
    assert got == reference.device_table(), \
        "scenarios/README.md: the device table is stale; run `python -m vm.scenario.reference`"


def _step_rows() -> dict:
    section = TEXT.split("## Steps", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`", cells[0]) if line.startswith("|") else None
        if m:
            rows[m.group(1)] = set(re.findall(r"`(\w+)`", cells[1]))
    return rows


def test_step_table_documents_every_step_kind_and_its_keys():
    rows = _step_rows()
    assert sorted(rows) == sorted(schema.STEPS), "step kinds in scenarios/README.md vs schema.STEPS"
    for kind, spec in schema.STEPS.items():
        keys = set(spec.fields)
        assert rows[kind] == keys, \
            f"`{kind}`: README names {sorted(rows[kind])}, the schema has {sorted(keys)}"
