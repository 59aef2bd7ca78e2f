"""The FSA benchmark's datasets: where they come from and what their bytes must hash to."""

from __future__ import annotations

from dataclasses import dataclass

#: HITSZ-HLT/FSA-Distillation, the paper's code release, pinned to one commit.
UPSTREAM_COMMIT = "c38bdfc80cf871ffd53e14f9441fcc33d968defd"
DEFAULT_SOURCE = f"https://raw.githubusercontent.com/HITSZ-HLT/FSA-Distillation/{UPSTREAM_COMMIT}"
SPLITS: tuple[str, ...] = ("train", "dev", "test", "hard_test")

#: sha256 of every benchmark file at UPSTREAM_COMMIT, by path inside the repository.
SHA256: dict[str, str] = {
    "fsa_datasets/w_hard/acsa/laptop16/dev.json": "74785156c40899fddbf6f323daaa4301be06c12db13221593b74a8908834213e",
    "fsa_datasets/w_hard/acsa/laptop16/hard_test.json": "f13dd7971991a1b5b6a69890b6c082a649cd9b8b145c34b33ebfe88aec36897b",  # noqa: E501
    "fsa_datasets/w_hard/acsa/laptop16/test.json": "6b2148317d1d132b84809b947e2598d587c234e326d236e4dcba6654e8c134cd",
    "fsa_datasets/w_hard/acsa/laptop16/train.json": "042ca71863e13d0b16fbb00c45c2d183dc43802fe70b159b1ef9f066984f6b33",
    "fsa_datasets/w_hard/acsa/rest16/dev.json": "35304ce547ad9ca015341c8ff5e67644867fc67dbbf331b531c5ff2ef0331a89",
    "fsa_datasets/w_hard/acsa/rest16/hard_test.json": "dc3684267fd4e656f8f0c6037dea89b5200bb27de7e61e1452f383976480afa0",  # noqa: E501
    "fsa_datasets/w_hard/acsa/rest16/test.json": "10d89d3dae1aa1d037fae29e09ffdbff01460f63499aae524379fc1388c1f8d9",
    "fsa_datasets/w_hard/acsa/rest16/train.json": "55c5fc70a120d996138c8df386a878215ea3ea75c38ab9de9507d9cf560651e4",
    "fsa_datasets/w_hard/atsa/laptop14/dev.json": "f9123858f82731641ebfacc2bbf3e880cfba3957d604dd47150f27d7b90439ee",
    "fsa_datasets/w_hard/atsa/laptop14/hard_test.json": "f13dd7971991a1b5b6a69890b6c082a649cd9b8b145c34b33ebfe88aec36897b",  # noqa: E501
    "fsa_datasets/w_hard/atsa/laptop14/test.json": "59b22e85d3a4ffff9d964b5d908cca2e3ab20abec03544ce3406c91c0bf49cf2",
    "fsa_datasets/w_hard/atsa/laptop14/train.json": "3ed4987d4428f6a4b820a8da32f6e0a1748ab2dea98b99380cd1572eb5fccf90",
    "fsa_datasets/w_hard/atsa/rest14/dev.json": "3573db15d08ba652a3516459aa277640d2508663686116c051bb78be6bd7a243",
    "fsa_datasets/w_hard/atsa/rest14/hard_test.json": "3cffd2e3808261a8a5b448a400898cf99d8e40f04e9877f5ab2ab65062d345cb",  # noqa: E501
    "fsa_datasets/w_hard/atsa/rest14/test.json": "c892fa55877de9efe1732e8a0d3c885c5e81f9d5c489d5dcbddd1463e247c83c",
    "fsa_datasets/w_hard/atsa/rest14/train.json": "c4e7f6908e0e0c1128ee8d74f18882fa72c4d762871d95570a898003d0fd1978",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset: its name (`atsa/rest14`), task and upstream folder."""

    name: str
    task: str
    folder: str

    @property
    def slug(self) -> str:
        """File- and metric-safe name: `atsa-rest14`."""
        return self.name.replace("/", "-")

    def path(self, split: str) -> str:
        """Upstream path of one split's JSON file."""
        return f"{self.folder}/{split}.json"


DATASETS: dict[str, DatasetSpec] = {
    name: DatasetSpec(name=name, task=name.split("/")[0], folder=f"fsa_datasets/w_hard/{name}")
    for name in ("atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16")
}


def get_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name, with the list of known names in the error."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
