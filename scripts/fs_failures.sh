#!/bin/bash
# Disk-full and read-only runs of every command that writes (docs/reliability.md). Linux, as root (it mounts
# small tmpfs file systems). Run from the repository root after `make setup`:  sudo scripts/fs_failures.sh
# Each line must read "rc=2 lines=1 tracebacks=0" (or rc=0 where the output fitted), and every earlier file
# must be unchanged.
set -u
S="$PWD/.venv/bin/sparsedit"; A="$PWD/src/sparsedit/assets/digits_dit"
export OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'umount "$T" 2>/dev/null; rmdir "$T"' EXIT
TRAIN=(train --model DiT-S/2 --hidden-size 64 --depth 4 --num-heads 2 --batch-size 8 --no-progress --device cpu)
FID=(sample-fid --ckpt "$A" --batch-size 10 --steps 2 --sampler ddim --device cpu --no-progress)

run() {
    local out rc
    out=$("$S" "$@" 2>&1 >/dev/null); rc=$?
    printf 'rc=%s lines=%s tracebacks=%s :: %s => %s\n' "$rc" "$(printf '%s' "$out" | grep -c '')" \
        "$(printf '%s' "$out" | grep -c Traceback)" "$1" "$(printf '%s' "$out" | tail -1 | cut -c1-150)"
}
digest() { (cd "$T" && find . -type f | sort | xargs -r sha256sum | sha256sum); }

for size in 400k 1200k 2500k 4m; do
    echo "== disk full: a ${size} file system holding one earlier file"
    mount -t tmpfs -o size=$size tmpfs "$T"; echo keep > "$T/keep.txt"; before=$(digest)
    run convert "$A" "$T/c_diff" --to diffusers
    run convert "$A" "$T/c_sp" --to sparsedit
    run sparsify "$A" --layout SparseDiT-S/2 --out "$T/sp"
    run sample --ckpt "$A" --steps 2 --sampler ddim --out "$T/s.png" --device cpu --no-progress
    run "${FID[@]}" --num-samples 400 --out "$T/fid"
    run analyze --ckpt "$A" --steps 2 --seeds 1 --max-k 1 --out "$T/an" --device cpu --no-progress
    run "${TRAIN[@]}" --steps 2 --run-dir "$T/run"
    [ "$(cat "$T/keep.txt")" == keep ] && echo "earlier file kept" || echo "EARLIER FILE LOST"
    echo "hidden temporary files left: $(find "$T" -name '.*.tmp' -o -name '.*.npy' | wc -l)"
    umount "$T"
done

echo "== read-only: earlier outputs, then the file system remounted read-only"
mount -t tmpfs -o size=64m tmpfs "$T"
"$S" "${TRAIN[@]}" --steps 2 --run-dir "$T/run" >/dev/null 2>&1
"$S" sparsify "$A" --layout SparseDiT-S/2 --out "$T/sp" >/dev/null
"$S" convert "$A" "$T/c_diff" --to diffusers >/dev/null 2>&1
"$S" "${FID[@]}" --num-samples 20 --out "$T/fid" >/dev/null 2>&1
before=$(digest)
mount -o remount,ro "$T"
run convert "$A" "$T/c2" --to diffusers
run convert "$A" "$T/c_diff" --to diffusers --overwrite
run sparsify "$A" --layout SparseDiT-S/2 --out "$T/sp" --overwrite
run sample --ckpt "$A" --steps 2 --sampler ddim --out "$T/s.png" --device cpu --no-progress
run "${FID[@]}" --num-samples 40 --out "$T/fid"
run "${FID[@]}" --num-samples 20 --out "$T/fid2"
run analyze --ckpt "$A" --steps 2 --seeds 1 --max-k 1 --out "$T/an" --device cpu --no-progress
run "${TRAIN[@]}" --steps 4 --run-dir "$T/run"
run "${TRAIN[@]}" --steps 2 --run-dir "$T/run2"
run compare "$A" "$T/sp" --num-samples 20 --seeds 0 --cfg-scales 1 --steps 2 --out "$T/cmp" --no-progress
run demo --out "$T/demo" --finetune-steps 2 --num-samples 20 --seeds 0 --cfg-scales 1 --sample-steps 2 --no-progress
[ "$before" == "$(digest)" ] && echo "all earlier files unchanged" || echo "FILES CHANGED"
