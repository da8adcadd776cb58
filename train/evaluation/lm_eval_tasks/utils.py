"""Loader of the bundled sample task: the JSONL beside this file, wherever the command runs from."""

from pathlib import Path


def load_sample(**_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("kormedmcqa_sample.jsonl"))})
