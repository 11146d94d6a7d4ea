#!/usr/bin/env python3
"""Picks a small corpus from a large one: greedy set cover over the per-input edge sets in a
libFuzzer control file written by `-set_cover_merge=1 -merge_control_file=FILE`.

    select-corpus.py CONTROL_FILE MAX_FILES > chosen.txt

Takes the input adding the most edges not yet covered (the smaller one on a tie) until
MAX_FILES are chosen or none adds anything; prints their paths, and the coverage kept on
stderr."""
import os
import sys

control, max_files = sys.argv[1], int(sys.argv[2])
lines = open(control).read().split('\n')
count = int(lines[0])
paths = lines[2:2 + count]
features = {}
for line in lines[2 + count:]:
    parts = line.split()
    if parts and parts[0] == 'FT':
        features[int(parts[1])] = set(map(int, parts[2:]))
every = set().union(*features.values())
sizes = {i: os.path.getsize(paths[i]) for i in features}
covered, chosen = set(), []
while len(chosen) < max_files:
    best = max(features, key=lambda i: (len(features[i] - covered), -sizes[i]))
    if not features[best] - covered:
        break
    chosen.append(best)
    covered |= features[best]
print(f"{len(chosen)} inputs cover {len(covered)} of {len(every)} edges "
      f"({100 * len(covered) / len(every):.1f}%), {sum(sizes[i] for i in chosen)} bytes",
      file=sys.stderr)
for i in chosen:
    print(paths[i])
