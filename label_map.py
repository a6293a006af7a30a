"""`--label-map FILE`: the source's "rough manual unification" ablation on top of MDP
(METHOD.md M1).

The file says which classes of the concatenated label space are the same class, and which to drop:

    # comments and blank lines are allowed
    ade20k:person = voc:person                   # ade20k:person becomes voc:person
    voc:cat = voc:dog = ade20k:animal            # a chain: cat -> dog -> animal, all three merged
    coco_stuff:wall-brick = ade20k:wall          # several lines with one target merge them all
    coco_stuff:wall-concrete = ade20k:wall
    voc:background = ignore                      # dropped: its pixels become IGNORE

Each `=` maps the name on its left onto the one on its right; a class's members are everything that
ends up on the same target, so merging is symmetric in effect whatever the direction written. Names
are `dataset:class` as `python datasets.py info --datasets ... --names` prints them. A class may be
mapped once (a repeat of the same line is harmless); a class mapped to itself, a cycle, an unknown
dataset or class, or a malformed line is an error naming FILE:LINE. `ignore` only ends a line.

`read_label_map` returns the map normalised ({"merge": [[name, ...], ...], "ignore": [name, ...]},
members in concatenation order, groups by their first member), so two files that mean the same give
the same dict, which is what checkpoints store. `resolve` turns it into the global ids.
"""
from __future__ import annotations

from pathlib import Path

IGNORE = -1  # == datasets.IGNORE (local copy: datasets.py imports this module)
IGNORE_WORD = "ignore"


def _concat_names(names: list[str], classes: list[list[str]]) -> list[str]:
    return [f"{n}:{c}" for n, cs in zip(names, classes) for c in cs]


def read_label_map(path: str | Path, names: list[str], classes: list[list[str]]) -> dict:
    """Parses FILE against the datasets `names` with class lists `classes`; returns the normalised
    map. Raises ValueError("FILE:LINE: ...") on the first bad line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (--label-map)") from None
    concat = _concat_names(names, classes)
    index = {n: i for i, n in reversed(list(enumerate(concat)))}  # name -> first concatenated id
    target: dict[int, int] = {}  # source id -> target id or IGNORE
    where: dict[int, int] = {}  # source id -> line that mapped it

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def fail(msg: str) -> ValueError:
            return ValueError(f"{path}:{lineno}: {msg}")

        terms = [t.strip() for t in line.split("=")]
        if len(terms) < 2 or not all(terms):
            raise fail(f"expected 'dataset:class = dataset:class' or 'dataset:class = ignore', "
                       f"got {line!r}")
        ids = []
        for k, term in enumerate(terms):
            if term == IGNORE_WORD:
                if k != len(terms) - 1:
                    raise fail(f"'{IGNORE_WORD}' can only end a line, got {line!r}")
                ids.append(IGNORE)
                continue
            ds, sep, cls = (s.strip() for s in term.partition(":"))
            if not sep:
                raise fail(f"expected dataset:class, got {term!r}")
            if ds not in names:
                raise fail(f"unknown dataset {ds!r} in {term!r}: this run's datasets are "
                           f"{', '.join(names)}")
            name = f"{ds}:{cls}"
            if name not in index:
                raise fail(f"unknown class {name!r}: not one of {ds}'s "
                           f"{len(classes[names.index(ds)])} classes (python datasets.py info "
                           f"--datasets ... --names lists them)")
            ids.append(index[name])
        for a, b in zip(ids, ids[1:]):  # a chain a = b = c maps a -> b and b -> c
            if a == b:
                raise fail(f"{concat[a]} is mapped to itself")
            if a in target:
                if target[a] == b:
                    continue  # the same mapping again: harmless
                old = concat[target[a]] if target[a] != IGNORE else IGNORE_WORD
                raise fail(f"{concat[a]} is mapped twice: to {old} on line {where[a]} and to "
                           f"{concat[b] if b != IGNORE else IGNORE_WORD} here")
            x, path_ids = b, [a, b]
            while x in target and x != IGNORE:
                x = target[x]
                path_ids.append(x)
                if x == a:
                    raise fail("cycle: " + " -> ".join(concat[i] for i in path_ids))
            target[a], where[a] = b, lineno
    if not target:
        raise ValueError(f"{path}: no mapping line (expected 'dataset:class = dataset:class' "
                         f"or 'dataset:class = ignore')")

    def root(i: int) -> int:
        while i in target and i != IGNORE:
            i = target[i]
        return i

    groups: dict[int, list[int]] = {}
    for i in sorted(set(target) | {t for t in target.values() if t != IGNORE}):
        groups.setdefault(root(i), []).append(i)
    ignore = groups.pop(IGNORE, [])
    merge = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return {"merge": [[concat[i] for i in g] for g in merge], "ignore": [concat[i] for i in ignore]}


def resolve(names: list[str], classes: list[list[str]], label_map: dict
            ) -> tuple[list[int], list[list[int]], list[str]]:
    """The normalised map applied to the concatenation (C classes) -> (lut, members, class_names):
    lut[i] = new global id of concatenated class i, or IGNORE; new ids are dense 0..C'-1 in the
    order of each class's first member; members[j] = concatenated ids merged into j (ascending);
    class_names[j] = its members' names joined by '=' (e.g. 'voc:person=ade20k:person')."""
    concat = _concat_names(names, classes)
    index = {n: i for i, n in reversed(list(enumerate(concat)))}
    rep = list(range(len(concat)))  # each class's representative: its group's first member
    try:
        for group in label_map["merge"]:
            ids = sorted(index[n] for n in group)
            for i in ids:
                rep[i] = ids[0]
        for n in label_map["ignore"]:
            rep[index[n]] = IGNORE
    except KeyError as e:
        raise ValueError(f"label map names {e.args[0]!r}, not a class of {names}") from None
    lut, new_id, members = [], {}, []
    for i, r in enumerate(rep):
        if r == IGNORE:
            lut.append(IGNORE)
            continue
        if r not in new_id:  # r <= i, so a group's id is assigned at its first member
            new_id[r] = len(members)
            members.append([])
        members[new_id[r]].append(i)
        lut.append(new_id[r])
    if not members:
        raise ValueError("the label map drops every class")
    return lut, members, ["=".join(concat[i] for i in m) for m in members]
