"""A client built only from protos/ — run as a script, never imported by the tests.

    python raw_client.py CONFIG.json

It generates Python stubs from the .proto files with grpc_tools.protoc into a fresh folder,
imports them (no module of the augsvc project is imported; the script checks that at the end),
calls GetServerInfo, Augment, AugmentStream and StreamBatches on every target in the config,
and writes what it received as .npy files plus a results.json for the test to compare.
Specs travel as the wire Pipeline, built from their JSON form with json_format.ParseDict.

It runs in its own interpreter because its generated augsvc/v1/augment.proto would clash in
the default descriptor pool with the project's own stubs, imported by the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

MAX_MESSAGE = 64 << 20


def generate(protos: Path, gen: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/descriptor.proto
    gen.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={gen}",
                      f"--grpc_python_out={gen}", str(protos / "augsvc" / "v1" / "augment.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # Regular packages, so that they win over the installed project on sys.path.
    for package in (gen / "augsvc", gen / "augsvc" / "v1"):
        (package / "__init__.py").touch()


def to_array(tensor: Any) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(tuple(tensor.shape))


def to_tensor(pb: Any, array: np.ndarray) -> Any:
    array = np.ascontiguousarray(array)
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))


def main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    out = Path(config["out"])
    gen = out / "gen"
    generate(Path(config["protos"]), gen)
    sys.path.insert(0, str(gen))
    from augsvc.v1 import augment_pb2 as pb
    from augsvc.v1 import augment_pb2_grpc as pb_grpc

    def pipeline(spec: dict[str, Any]) -> Any:
        return json_format.ParseDict(spec, pb.Pipeline())

    results: dict[str, Any] = {}
    for name, target in config["targets"].items():
        channel = grpc.insecure_channel(target, options=[
            ("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE)])
        stub = pb_grpc.AugmenterStub(channel)
        info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
        res: dict[str, Any] = {"info": json_format.MessageToDict(info, preserving_proto_field_name=True),
                               "augment": {}, "augment_stream": {}, "stream": {}}

        requests = []
        for tag, case in enumerate(config["augment"]):
            images = np.random.default_rng(case["data_seed"]).integers(0, 256, case["shape"], dtype=np.uint8)
            np.save(out / f"{name}.augment.{case['name']}.input.npy", images)
            req = pb.AugmentRequest(spec=pipeline(config["specs"][case["spec"]]),
                                    images=to_tensor(pb, images), seed=case["seed"], epoch=case["epoch"],
                                    sample_ids=case["sample_ids"], backend=case["backend"], tag=tag)
            requests.append(req)
            reply = stub.Augment(req, timeout=60)
            np.save(out / f"{name}.augment.{case['name']}.output.npy", to_array(reply.images))
            res["augment"][case["name"]] = {"sample_ids": list(reply.sample_ids), "tag": reply.tag,
                                            "dtype": reply.images.dtype}

        for reply in stub.AugmentStream(iter(requests), timeout=60):
            case = config["augment"][reply.tag]
            np.save(out / f"{name}.augment_stream.{case['name']}.output.npy", to_array(reply.images))
            res["augment_stream"][case["name"]] = {"sample_ids": list(reply.sample_ids), "tag": reply.tag}

        for case in config["stream"]:
            fields = {k: v for k, v in case.items() if k not in ("name", "spec")}
            req = pb.StreamBatchesRequest(spec=pipeline(config["specs"][case["spec"]]), **fields)
            batches = list(stub.StreamBatches(req, timeout=60))
            images = [to_array(b.images) for b in batches]
            np.save(out / f"{name}.stream.{case['name']}.images.npy",
                    np.concatenate(images) if images else np.zeros((0,), np.uint8))
            res["stream"][case["name"]] = {
                "epochs": [b.epoch for b in batches], "batch_index": [b.batch_index for b in batches],
                "sample_ids": [list(b.sample_ids) for b in batches],
                "labels": [list(b.labels) for b in batches],
                "shapes": [list(b.images.shape) for b in batches],
                "dtypes": [b.images.dtype for b in batches]}
        channel.close()
        results[name] = res

    project = Path(config["project_package"]).resolve()
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    loaded = sorted(name for name, file in files.items()
                    if file and Path(file).resolve().is_relative_to(project))
    results["stubs"] = {"augment_pb2": str(Path(pb.__file__).resolve()),
                        "augment_pb2_grpc": str(Path(pb_grpc.__file__).resolve()),
                        "project_modules_loaded": loaded}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
