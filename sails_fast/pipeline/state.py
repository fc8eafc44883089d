"""run_state.json: what every finished step of a run was computed from, and what it wrote.

Per step it records
- `config_key`: a hash of the step's own config keys chained with its upstream steps' keys;
- `fingerprint`: the same with the digests of the outside inputs (data files, model and SAE folders, by
  content: `sails_fast.core.digests`);
- `config` and `inputs`: the values behind them, so a mismatch can say what changed;
- `outputs`: sha256 of every file the step wrote, and `content`: a digest of those and of its upstream
  steps' contents, so a step whose input artifact was recomputed to something else is recomputed too.

Before anything is written, `check` compares the recorded steps with today's config: a changed config key
is refused (naming each key, old -> new) unless `force`; a changed input or `from_step` only marks steps for
recomputation, with the reason. At each step `reusable` also verifies the step's files: a missing one is
recomputed, a damaged one (checksum mismatch) is an error naming it, recomputed by `force` or by deleting
the file. Nothing here ever needs a hand edit of run_state.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sails_fast.core import distributed
from sails_fast.core.digests import file_sha256

log = logging.getLogger(__name__)


STATE_FILE = "run_state.json"


STATE_FORMAT = 2


def stable_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{"a.b.c": leaf} for nested dicts (lists and tuples are leaves, as JSON lists)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.loads(json.dumps(value, default=str))}


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """["select.top_k: 8 -> 5", ...] for the keys whose values differ (missing shown as <unset>)."""
    unset = "<unset>"
    return [
        f"{k}: {json.dumps(old.get(k, unset))} -> {json.dumps(new.get(k, unset))}"
        for k in sorted(set(old) | set(new))
        if old.get(k, unset) != new.get(k, unset)
    ]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


class RunState:
    """The run directory's record of its steps (see the module docstring).

    Args:
        out_dir: the run directory (nothing is written by the constructor or by `check`).
        steps: every step name, in order.
        depends: {step: the steps whose artifacts it reads}.
        configs: {step: its own config keys, flattened ("sails.select.top_k": 8)}.
        config_keys, fingerprints: {step: hash} without and with the input digests.
        inputs: {step: {input name: digest}} of the outside inputs each step's fingerprint covers.
        force: recompute steps recorded with another config instead of refusing; recompute damaged files.
        from_step: recompute this step and every later one whatever their records say.
        config_files: {step: (the config file it writes when it runs, the config prefix of its keys)}: read
            to bring records of an earlier sails_fast up to today's keys.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        steps: Sequence[str],
        depends: Mapping[str, Sequence[str]],
        configs: Mapping[str, dict],
        config_keys: Mapping[str, str],
        fingerprints: Mapping[str, str],
        inputs: Mapping[str, dict],
        force: bool = False,
        from_step: str | None = None,
        config_files: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        if from_step is not None and from_step not in steps:
            raise ValueError(f"from_step: expected one of {tuple(steps)}, got {from_step!r}")
        self.out_dir, self.path = out_dir, out_dir / STATE_FILE
        self.steps, self.depends = tuple(steps), depends
        self.configs, self.config_keys, self.fingerprints = configs, config_keys, fingerprints
        self.inputs, self.force, self.from_step = inputs, force, from_step
        self.config_files = dict(config_files or {})
        self.done: dict[str, dict] = {}
        self.legacy = False
        self.reasons: dict[str, str] = {}
        self.forced: list[str] = []  # recorded with another config, recomputed by force
        self.adopted: list[str] = []  # recorded with fewer fingerprinted keys, all at today's values
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            if not self.force:
                raise ValueError(
                    f"out_dir: {self.path} is damaged ({err}); use --force (force=True) to recompute every "
                    "step, or a new output directory"
                ) from err
            log.warning("%s is damaged (%s): recomputing every step", self.path, err)
            return
        if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
            self.done = {k: v for k, v in data.get("steps", {}).items() if isinstance(v, dict)}
        else:
            # written by an earlier sails_fast: step fingerprints of another kind, nothing to verify
            self.legacy = bool(data.get("steps")) if isinstance(data, dict) else True

    def check(self, wanted: Sequence[str], previous_config: Mapping[str, Any] | None = None) -> None:
        """Refuse a config change (unless `force`) before anything is written; note each step that will be
        recomputed for a changed input, a changed config (forced) or `from_step`, with the reason.

        `previous_config`: the flattened config.json of the last run, compared for a legacy state file.
        """
        if self.legacy:
            self._check_legacy(wanted, previous_config)
            return
        changed = [
            s for s in wanted if s in self.done and self.done[s].get("config_key") != self.config_keys[s]
        ]
        changed = self._adopt_new_keys(changed)
        if changed and not self.force:
            raise ValueError(
                f"out_dir: {self.out_dir} holds step(s) {', '.join(changed)} computed with another "
                f"configuration ({'; '.join(self._config_changes(changed))}); use a new output directory, "
                "or --force (force=True) to recompute them and every step after them"
            )
        self.forced = changed
        for s in wanted:
            record = self.done.get(s)
            if self.rerun(s):
                self.reasons[s] = f"--from {self.from_step}"
            elif record is None:
                continue
            elif s in changed:
                self.reasons[s] = "config changed: " + "; ".join(self._config_changes([s]))
            elif record.get("fingerprint") != self.fingerprints[s]:
                names = [
                    name
                    for name, digest in self.inputs[s].items()
                    if record.get("inputs", {}).get(name) != digest
                ]
                self.reasons[s] = f"input changed since the last run: {', '.join(names) or 'unknown'}"

    def _adopt_new_keys(self, changed: list[str]) -> list[str]:
        """The changed steps less those recorded by an earlier sails_fast that fingerprinted fewer keys, where
        the config file the step wrote when it ran (`config_files`) shows today's value for every key its
        record lacks, and nothing else changed: their records are brought up to today's keys (written by
        `start`)."""
        still = []
        for s in changed:
            record, now = self.done[s], self.configs[s]
            old, shown = record.get("config", {}), self._recorded_config(s)
            same = all(now.get(k) == v for k, v in old.items() if k in now) and all(
                k in old or (k in shown and shown[k] == v) for k, v in now.items()
            )
            upstream_kept = all(d not in still for d in self.depends.get(s, ()))
            if same and upstream_kept and record.get("inputs") == self.inputs[s]:
                record.update(config=now, config_key=self.config_keys[s], fingerprint=self.fingerprints[s])
                self.adopted.append(s)
            else:
                still.append(s)
        return still

    def _recorded_config(self, step: str) -> dict[str, Any]:
        """The flattened config `step` wrote when it last ran (not config.json, which is the last run's, and
        that run may have reused the step); {} without one, or when the record's checksum of it fails."""
        if step not in self.config_files:
            return {}
        rel, prefix = self.config_files[step]
        digest, path = self.done[step].get("outputs", {}).get(rel), self.out_dir / rel
        try:
            if digest is not None and file_sha256(path) != digest:
                return {}
            return flatten(json.loads(path.read_text()), prefix)
        except (OSError, ValueError):
            return {}

    def start(self) -> None:
        """Once the run starts: write the records `check` brought up to date, and forget those of the steps
        it let `force` recompute, so a forced run killed before they finish reruns without --force."""
        for s in self.forced:
            self.done.pop(s, None)
        if self.forced or self.adopted:
            write_json_atomic(self.path, {"format": STATE_FORMAT, "steps": self.done})

    def _config_changes(self, steps: Sequence[str]) -> list[str]:
        """The changed keys of these steps' own configs ("select.top_k: 8 -> 5"), each once."""
        changes: list[str] = []
        for s in steps:
            for line in describe_changes(self.done[s].get("config", {}), self.configs[s]):
                if line not in changes:
                    changes.append(line)
        return changes or ["an upstream step's configuration changed"]

    def _check_legacy(self, wanted: Sequence[str], previous: Mapping[str, Any] | None) -> None:
        now = {k: v for s in self.steps for k, v in self.configs[s].items()}
        # keys the earlier version did not write (newer options) cannot have changed
        shared = [k for k in now if previous and k in previous]
        changes = describe_changes({k: previous[k] for k in shared}, {k: now[k] for k in shared})
        if changes and not self.force:
            raise ValueError(
                f"out_dir: {self.out_dir} was made by an earlier sails_fast with another configuration "
                f"({'; '.join(changes)}); use a new output directory, or --force (force=True) to recompute it"
            )
        for s in wanted:
            self.reasons[s] = "run_state.json from an earlier sails_fast (no content fingerprints)"

    # ------------------------------------------------------------------ per step

    def reusable(self, step: str, outputs: Sequence[Path]) -> bool:
        """Whether `step` can be loaded from disk: recorded with today's fingerprint, its upstream steps'
        contents unchanged, and `outputs` (the files it wrote) present and intact.

        Raises ValueError naming the file when one is damaged, unless `force`.
        """
        if step in self.reasons:
            return False
        record = self.done.get(step)
        if record is None:
            return False
        for dep in self.depends.get(step, ()):
            if record.get("upstream", {}).get(dep) != self.content(dep):
                self.reasons[step] = f"its input step '{dep}' was recomputed"
                return False
        recorded = record.get("outputs", {})
        for path in outputs:
            rel = path.relative_to(self.out_dir).as_posix()
            if rel not in recorded:
                self.reasons[step] = f"{rel} was not recorded when the step finished"
                return False
        for rel, digest in recorded.items():
            path = self.out_dir / rel
            if not path.is_file():
                self.reasons[step] = f"{rel} is missing"
                return False
            if file_sha256(path) != digest:
                if self.force:
                    self.reasons[step] = f"{rel} is damaged (checksum mismatch)"
                    return False
                raise ValueError(
                    f"{path}: does not match the checksum recorded when step '{step}' wrote it (damaged or "
                    f"edited); delete it and rerun, or rerun with --force (force=True), to recompute '{step}'"
                )
        return True

    def rerun(self, step: str) -> bool:
        """Whether `from_step` asks for `step` to be recomputed from scratch."""
        return self.from_step is not None and self.steps.index(step) >= self.steps.index(self.from_step)

    def content(self, step: str) -> str | None:
        record = self.done.get(step)
        return None if record is None else record.get("content")

    def content_key(self, step: str) -> str:
        """Today's fingerprint of `step` with its upstream steps' contents: what a resumable step (train)
        checks its partial work against."""
        return stable_hash(self.fingerprints[step], {d: self.content(d) for d in self.depends.get(step, ())})

    def finish(self, step: str, outputs: Sequence[Path], seconds: float) -> None:
        """Record `step` as computed now, with the digests of the files it wrote."""
        files = {p.relative_to(self.out_dir).as_posix(): file_sha256(p) for p in sorted(outputs)}
        upstream = {d: self.content(d) for d in self.depends.get(step, ())}
        self.done[step] = {
            "fingerprint": self.fingerprints[step],
            "config_key": self.config_keys[step],
            "config": self.configs[step],
            "inputs": self.inputs[step],
            "outputs": files,
            "upstream": upstream,
            "content": stable_hash(files, upstream),
            "seconds": round(seconds, 2),
            "world_size": distributed.group_size(),
        }
        self.legacy = False
        write_json_atomic(self.path, {"format": STATE_FORMAT, "steps": self.done})
