"""Conversion throughput: the Ray Data engine vs the in-process engine on CREMA-D-sized clips.

Writes a raw CREMA-D tree of generated clips at the real format (480x360 FLV at 30 fps with
2.5 s of 16 kHz speech-length WAV), converts it with the default CREMA-D settings (1 frame at
224, 22.05 kHz log-STFT [257, 188]) once in-process and once on a local Ray with all CPUs,
checks both outputs are byte-identical, and prints samples/s and the ratio.

    python bench/convert.py [--clips 96] [--work /tmp/mmbalance-bench-convert]

Expectation: on N cores the Ray engine approaches N x the in-process rate (decoding is
independent per chunk), minus Ray's start-up and the driver's assembly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from media_fixtures import write_video, write_wav  # noqa: E402
from mmbalance.data.convert import build_converter  # noqa: E402
from mmbalance.data.convert.cremad import EMOTIONS  # noqa: E402
from mmbalance.data.convert.pipeline import convert  # noqa: E402


def make_tree(root: Path, clips: int) -> None:
    for k in range(clips):
        name = f"{1001 + k // 12}_DFA_{EMOTIONS[k % 6]}_{'XX' if k % 12 < 6 else 'HI'}"
        write_wav(root / "AudioWAV" / f"{name}.wav", seconds=2.5, rate=16000, freq=120 + 7 * k)
        write_video(root / "VideoFlash" / f"{name}.flv", frames=75, fps=30, size=(480, 360), value=k)


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--work", default="/tmp/mmbalance-bench-convert")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    make_tree(work / "raw", args.clips)
    print(f"wrote {args.clips} clips in {time.perf_counter() - started:.1f} s")

    quiet = lambda _: None  # noqa: E731
    converter = build_converter("cremad", {})
    rates = {}
    for engine in ("local", "ray"):
        if engine == "ray":
            import ray

            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        convert(converter, work / "raw", work / engine, engine=engine, chunk_size=args.chunk_size, progress=quiet)
        seconds = time.perf_counter() - started
        rates[engine] = args.clips / seconds
        print(f"{engine:>5} engine: {seconds:6.1f} s, {rates[engine]:6.1f} clips/s")
    ray.shutdown()
    same = digest(work / "local") == digest(work / "ray")
    print(f"ray / local throughput: {rates['ray'] / rates['local']:.2f} on {os.cpu_count()} CPUs; "
          f"identical shards: {same}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
