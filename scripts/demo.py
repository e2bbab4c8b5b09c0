"""Opens the FiftyOne App with the plugin loaded on a demo dataset of real
photos. Run it through ``bash scripts/demo.sh``.

Usage: demo.py [--port 5151] [--address 0.0.0.0] [--overwrite]
"""

import argparse
import os
import pathlib
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _plugins_dir():
    # FiftyOne discovers plugins under FIFTYONE_PLUGINS_DIR; a symlink to this
    # checkout makes edits live
    if os.environ.get("FIFTYONE_PLUGINS_DIR"):
        return os.environ["FIFTYONE_PLUGINS_DIR"]
    path = pathlib.Path(tempfile.gettempdir()) / "bulk_labeling_plugins"
    path.mkdir(exist_ok=True)
    link = path / "bulk_labeling"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5151)
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--name", default="bulk-labeling-demo")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-wait", action="store_true")
    args = parser.parse_args()

    os.environ["FIFTYONE_PLUGINS_DIR"] = _plugins_dir()
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")

    import fiftyone as fo
    from fiftyone.operators.registry import OperatorRegistry

    import bulk_labeling as bl
    from bulk_labeling.demo_data import load_demo_dataset

    dataset = load_demo_dataset(args.name, overwrite=args.overwrite)
    bl.history(dataset)  # warns about interrupted operations, if any

    errors = OperatorRegistry().list_errors()
    if errors:
        print("Plugin registration errors:\n%s" % "\n".join(errors))

    print("Dataset '%s': %d real photos" % (dataset.name, len(dataset)))
    session = fo.launch_app(
        dataset, port=args.port, address=args.address, remote=True
    )
    print("Open http://localhost:%d in your browser" % args.port)
    if not args.no_wait:
        session.wait(-1)


if __name__ == "__main__":
    main()
