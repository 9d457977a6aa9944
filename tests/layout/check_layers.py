#!/usr/bin/env python3
"""The include graph of the library folders points one way (issue 21).

Reads every #include "folder/..." of the library sources (not tests, bench, fuzz) and checks:
  - each folder includes only the folders ALLOWED lists for it (a new edge is a design decision:
    add it here, in the same change, where a reviewer sees it);
  - ALLOWED itself has no cycle;
  - the torch-free and gRPC-free folders include no <grpcpp/...>, and the torch-free ones no
    <torch/...>.
Exits 1 naming every offending file and include.
"""
import os
import re
import sys

ALLOWED = {
    'common': set(),
    'safetensors': {'common'},
    'spectral': {'common'},
    'policy': {'common'},
    'metrics': {'common'},
    'config': {'common', 'policy'},
    'proto': set(),
    'api': {'common', 'config', 'proto'},
    'trainer/models': {'common', 'config', 'safetensors', 'spectral'},
    'trainer/data': {'common'},
    'trainer/optim': {'common', 'spectral'},
    'trainer/checkpoint': {'common', 'safetensors', 'trainer/models'},
    'trainer': {'common', 'config', 'policy', 'spectral', 'trainer/models', 'trainer/data',
                'trainer/optim', 'trainer/checkpoint'},
    'coordinator': {'api', 'common', 'config', 'metrics', 'policy', 'proto'},
    'worker': {'api', 'common', 'config', 'metrics', 'proto', 'safetensors', 'trainer',
               'trainer/checkpoint', 'trainer/models', 'trainer/data', 'trainer/optim'},
    'client': {'api', 'common', 'proto'},
}
NO_GRPC = {'common', 'safetensors', 'spectral', 'policy', 'config', 'trainer/models',
           'trainer/data', 'trainer/optim', 'trainer/checkpoint', 'trainer'}
NO_TORCH = {'common', 'safetensors', 'policy', 'config', 'metrics', 'api', 'coordinator', 'client'}
EXTERNAL = {'absl', 'spdlog', 'nlohmann', 'CLI', 'yaml-cpp', 'google', 'grpcpp', 'boost', 'gloo'}


def folder_of(path):
    parts = path.split('/')
    if parts[0] == 'trainer' and len(parts) > 2:
        return 'trainer/' + parts[1]
    if parts[0] == 'mat':  # generated proto headers: mat/v1/*.pb.h
        return 'proto'
    return parts[0]


def main(root):
    errors = []
    for folder in ALLOWED:  # acyclic: a depth-first walk finds no back edge
        stack, seen = [(folder, [folder])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in ALLOWED[node]:
                if nxt == folder:
                    errors.append('ALLOWED has a cycle: ' + ' -> '.join(trail + [nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    checked = 0
    for dirpath, _, names in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        top = rel_dir.split(os.sep)[0]
        if top in ('tests', 'bench', 'fuzz', '.git') or top.startswith('build'):
            continue
        for name in names:
            if not name.endswith(('.h', '.cc')):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            src = folder_of(rel)
            if src not in ALLOWED:
                if src not in ('cmake', 'scripts', 'deploy', 'dashboards', 'examples', '.'):
                    errors.append(f'{rel}: folder {src} is not in ALLOWED')
                continue
            checked += 1
            text = open(os.path.join(root, rel), encoding='utf-8').read()
            for inc in re.findall(r'#include "([^"]+)"', text):
                if '/' not in inc or inc.split('/')[0] in EXTERNAL:
                    continue
                dst = folder_of(inc)
                if dst != src and dst not in ALLOWED[src]:
                    errors.append(f'{rel}: includes "{inc}" ({src} may include only '
                                  f'{", ".join(sorted(ALLOWED[src])) or "nothing"})')
            for inc in re.findall(r'#include <([^>]+)>', text):
                if src in NO_GRPC and inc.startswith('grpcpp/'):
                    errors.append(f'{rel}: includes <{inc}>; {src} knows nothing of gRPC')
                if src in NO_TORCH and inc.startswith(('torch/', 'ATen/', 'c10/')):
                    errors.append(f'{rel}: includes <{inc}>; {src} is LibTorch-free')
    if checked < 50:
        errors.append(f'only {checked} files checked under {root}: wrong root?')
    for e in errors:
        print(e)
    print(f'{checked} files checked, {len(errors)} problems')
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else '.'))
