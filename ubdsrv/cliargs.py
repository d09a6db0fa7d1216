"""Reading a command line the way ublksrv's C `ublk` does: glibc getopt_long and strtol.

The C tool reads one argv several times, each reader with its own option table (the common options in
ublksrv_parse_add_opts, then the target's own in its init_tgt): an option one reader does not know it
skips, a word it does not know it skips. `getopt_long` below reproduces one such reading, item by item,
so the CLI can run the same readings and then say what no reader took (the C tool stays silent there;
we name the option and exit 2).

Standard library only, no driver: everything here is a pure function of argv."""
_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class Option:
    """One command-line option: how getopt finds it, how its value reads, what `help` says.

    name: the long name, without the dashes; short: one letter, or "" (long option only);
    kind: flag (no argument), int (strtol base 10), hex (strtol base 16), float, size (bytes,
    K/M/G/T suffixes), str, path, choice (one of `choices`).
    (Plain classes here, not dataclasses: `ublk` starts in a TCG guest, where imports cost.)"""

    def __init__(self, name, short="", kind="flag", default=None, help="", metavar="", choices=()):
        self.name, self.short, self.kind, self.default = name, short, kind, default
        self.help, self.metavar, self.choices = help, metavar, tuple(choices)

    def __repr__(self):
        return f"Option({self.spelling})"

    @property
    def takes_arg(self):
        return self.kind != "flag"

    @property
    def spelling(self):
        """`-f/--file` or `--offset`, as messages name the option."""
        return f"-{self.short}/--{self.name}" if self.short else f"--{self.name}"

    def usage(self):
        """`-f FILE` / `--buffered_io` / `--base null|loop`, for `ublk help`."""
        opt = f"-{self.short}" if self.short else f"--{self.name}"
        if not self.takes_arg:
            return opt
        meta = self.metavar or ("|".join(self.choices) if self.choices else self.name.upper())
        return f"{opt} {meta}"

    def default_text(self):
        """` (default 250G)` for `help`, or "" when the default is "not given"."""
        if self.default in (None, "", False, 0, 0.0):
            return ""
        d = self.default
        if self.kind == "size":
            for suffix in "TGMK":
                unit = _SIZE_SUFFIX[suffix.lower()]
                if d % unit == 0:
                    d = f"{d // unit}{suffix}"
                    break
        return f" (default {d})"

    def convert(self, text, given_as=None):
        """The value of `text` for this option; raises ValueError with a message naming the option.
        Numbers read as C's strtol reads them; `notes` on the result list what strtol ignored."""
        who = given_as or self.spelling
        if self.kind in ("int", "hex"):
            value, rest = strtol(text, 16 if self.kind == "hex" else 10)
            if value is None:
                raise ValueError(f"{who}: expected a number, not {text!r}")
            return Value(value, [f"{who} {text}: read as {value}, as C's strtol does "
                                 f"(ignoring {rest!r})"] if rest else [])
        if self.kind == "float":
            try:
                return Value(float(text))
            except ValueError:
                raise ValueError(f"{who}: expected a number, not {text!r}") from None
        if self.kind == "size":
            return Value(parse_size(text, who))
        if self.kind == "choice" and text not in self.choices:
            raise ValueError(f"{who}: expected one of {', '.join(self.choices)}, not {text!r}")
        return Value(text)


class Value:
    def __init__(self, value, notes=()):
        self.value, self.notes = value, list(notes)


def strtol(text, base=10):
    """(value, rest) as C's strtol(text, &end, base) reads it: leading white space, one sign, then the
    digits of `base` (base 16 also takes a 0x prefix). value is None when no digit was read (strtol
    would return 0); rest is what strtol leaves unread."""
    s = text.lstrip(" \t\n\v\f\r")
    i = 0
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        i = 1
    if base == 16 and s[i:i + 2].lower() == "0x" and s[i + 2:i + 3].lower() in tuple("0123456789abcdef"):
        i += 2
    digits = "0123456789abcdef"[:base]
    j = i
    while j < len(s) and s[j].lower() in digits:
        j += 1
    if j == i:
        return None, text
    return sign * int(s[i:j], base), s[j:]


def parse_size(text, who="size"):
    """Bytes from `1073741824`, `512M`, `10G`, `2GiB`, `4k`; raises ValueError naming `who`."""
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    num = t.rstrip("kmgtb")
    try:
        return int(num, 10) * _SIZE_SUFFIX[t[len(num):]]
    except (ValueError, KeyError):
        raise ValueError(f"{who}: expected a size (e.g. 1073741824, 512M, 10G), not {text!r}") from None


# ---- getopt_long ---------------------------------------------------------------------------------
class Item:
    """One thing getopt_long returned.

    kind: opt (option, value: its text or True), missing (an option that needs a value ended argv),
    unknown (name: `-x` or `--xyz`), ambiguous (an abbreviation of several long options), extra
    (`--flag=value` for a flag), word (a non-option argument), end (`--`: the rest is not read).
    index: argv position of the option (or word); name: how it was written (`-r`, `--user_rec`);
    arg_index: argv position of a separate option value, else -1."""

    def __init__(self, kind, index, option=None, value=None, name="", arg_index=-1):
        self.kind, self.index, self.option, self.value = kind, index, option, value
        self.name, self.arg_index = name, arg_index


def getopt_long(argv, options):
    """Read argv as glibc's getopt_long does with an option string starting `-:` (words are returned
    in place, no error is printed) and `options` as the long and short option table.

    What the C tool relies on, reproduced here: an option that takes a value takes the next argument
    whatever it looks like (`-r -q 2` gives -r the value "-q"); a value may be glued on (`-q4`,
    `--queues=4`); short options cluster (`-zq4`); a long option may be abbreviated while the
    abbreviation is unambiguous (`--buff`); `--` ends the reading."""
    shorts = {o.short: o for o in options if o.short}
    items = []
    i, n = 0, len(argv)
    while i < n:
        tok = argv[i]
        if tok == "--":
            items.append(Item("end", i))
            break
        if tok.startswith("--"):
            name, eq, glued = tok[2:].partition("=")
            exact = [o for o in options if o.name == name]
            found = exact or [o for o in options if o.name.startswith(name)]
            if not found:
                items.append(Item("unknown", i, name="--" + name))
            elif len(found) > 1:
                items.append(Item("ambiguous", i, name="--" + name,
                                  value=tuple("--" + o.name for o in found)))
            else:
                o = found[0]
                if not o.takes_arg:
                    items.append(Item("extra", i, o, glued, "--" + name) if eq else
                                 Item("opt", i, o, True, "--" + name))
                elif eq:
                    items.append(Item("opt", i, o, glued, "--" + name))
                elif i + 1 < n:
                    items.append(Item("opt", i, o, argv[i + 1], "--" + name, i + 1))
                    i += 1
                else:
                    items.append(Item("missing", i, o, name="--" + name))
            i += 1
            continue
        if tok.startswith("-") and tok != "-":
            j = 1
            while j < len(tok):
                c = tok[j]
                j += 1
                o = shorts.get(c)
                if o is None:
                    items.append(Item("unknown", i, name="-" + c))
                elif not o.takes_arg:
                    items.append(Item("opt", i, o, True, "-" + c))
                elif j < len(tok):
                    items.append(Item("opt", i, o, tok[j:], "-" + c))
                    break
                elif i + 1 < n:
                    items.append(Item("opt", i, o, argv[i + 1], "-" + c, i + 1))
                    i += 1
                    break
                else:
                    items.append(Item("missing", i, o, name="-" + c))
            i += 1
            continue
        items.append(Item("word", i, value=tok))
        i += 1
    return items


class Reading:
    """The result of one or more getopt_long readings of the same argv, each with its own table.

    values: option name -> converted value (the last occurrence wins, as in the C tool);
    given: option name -> how it was last written (`-q`); missing: names of options whose value was
    cut off by the end of argv (the C tool ignores them); notes: what strtol ignored;
    errors: what no reading could take, one message each."""

    def __init__(self, argv, tables, strict=True):
        self.values, self.given, self.notes, self.errors = {}, {}, [], []
        self.missing = {}
        readings = [getopt_long(argv, options) for options in tables]
        # a token one table took as an option's value is not read as an option by the others
        # (`-f -odd.img`: the loop table's file name, not -o with the value "dd.img")
        values_at = {it.arg_index for items in readings for it in items if it.arg_index >= 0}
        claimed, words, per_table_unknown, unknown = set(), {}, [], []
        for items in readings:
            seen_unknown = set()
            for it in items:
                if it.kind == "end":
                    claimed.update(range(it.index, len(argv)))
                elif it.kind == "word":
                    words.setdefault(it.index, it.value)
                elif it.index in values_at and it.index != it.arg_index:
                    continue
                elif it.kind in ("unknown", "ambiguous", "extra"):
                    seen_unknown.add(it.name)
                    unknown.append(it)
                else:
                    claimed.add(it.index)
                    if it.arg_index >= 0:
                        claimed.add(it.arg_index)
                    self._take(it)
            per_table_unknown.append(seen_unknown)
        if not strict:
            return
        # An option every table calls unknown, a word no table took as a value: the C tool ignores
        # both silently; a typo then changes the device without a word, so we refuse.
        reported = set()
        for it in sorted(unknown, key=lambda it: it.kind == "unknown"):   # the precise message first
            if it.name in reported or not all(it.name in s for s in per_table_unknown):
                continue
            reported.add(it.name)
            if it.kind == "ambiguous":
                self.errors.append(f"{it.name}: ambiguous (could be {', '.join(it.value)})")
            elif it.kind == "extra":
                self.errors.append(f"{it.name}: takes no value (given {it.name}={it.value})")
            else:
                self.errors.append(f"{it.name}: unknown option")
        for k in sorted(words):
            if k not in claimed:
                self.errors.append(f"{words[k]!r}: unexpected argument")

    def _take(self, it):
        o = it.option
        if it.kind == "missing":
            self.missing[o.name] = it.name
            return
        self.missing.pop(o.name, None)
        self.given[o.name] = it.name
        if not o.takes_arg:
            self.values[o.name] = True
            return
        try:
            v = o.convert(it.value, it.name)
        except ValueError as e:
            self.errors.append(str(e))
            return
        self.values[o.name] = v.value
        self.notes.extend(v.notes)

    def get(self, option):
        """The option's value, or its default when it was not given."""
        return self.values.get(option.name, option.default)
