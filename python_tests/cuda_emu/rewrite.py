"""Mechanical source pass: CUDA sources -> C++ the host compiler accepts, on top of cuda_emu.h.

    python rewrite.py SRC_DIR OUT_DIR [FALLBACK_ROOT]


Every *.cu, *.cuh and *.h of SRC_DIR is written to OUT_DIR with the same name (a .cu gets
.cu.cpp), starting with `#include "cuda_emu.h"` and a `#line 1` directive, so that compiler
errors, sanitizer reports and emulator faults name the original file and line. Every
rewrite stays on the line it starts on; nothing else changes:

  kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(kernel, grid, block, smem, stream)(args)
  extern __shared__ __align__(16) T name[];    ->  T* const name = static_cast<T*>(::emu::dynamic_smem(16));
  __shared__ T a[N][M], b;                     ->  auto& a = ::emu::shared_var<T[N][M]>(...); auto& b = ...;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(s), "r"(n));
                                               ->  ::emu::ptx::cp_async_cg_shared_global((d), (s), 16, (n));
  __global__ ... name(...) {                   ->  ... { ::emu::kernel_entered("name");

An inline-PTX instruction becomes a call of emu::ptx::<opcode with '.' -> '_'>; one the
emulator lacks is a compile error, never a silent no-op. OUT_DIR/kernels.txt lists the
__global__ functions found, for the harness's coverage check.

Headers the sources include from sibling folders ("../common/x.h") are passed through the
same way into the matching sibling of OUT_DIR, taken from SRC_DIR/.. or, when a copy of the
kernel folder stands alone, from FALLBACK_ROOT (the repository's csrc/).
"""
import pathlib
import re
import sys

IDENT = re.compile(r"[A-Za-z_]\w*")


class RewriteError(Exception):
    pass


def mask_comments_and_strings(text):
    """The text with comments and the insides of string/char literals blanked (same length,
    newlines kept), so that searches for tokens see only code."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if text[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def matching(masked, open_pos, open_ch="(", close_ch=")"):
    """Index of the bracket closing the one at open_pos."""
    depth = 0
    for i in range(open_pos, len(masked)):
        if masked[i] == open_ch:
            depth += 1
        elif masked[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise RewriteError(f"unbalanced {open_ch} at offset {open_pos}")


def split_top_level(s, sep):
    """Split s at `sep` characters outside (), [], {} and string literals."""
    parts, depth, cur, i, quote = [], 0, [], 0, None
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\":
                cur.append(s[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            cur.append(c)
        elif c in "([{":
            depth += 1
            cur.append(c)
        elif c in ")]}":
            depth -= 1
            cur.append(c)
        elif c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def keep_newlines(original, replacement):
    """replacement, followed by as many newlines as `original` spans (line numbers stay)."""
    return replacement + "\n" * original.count("\n")


# ---- kernel launches ------------------------------------------------------------------------
def callee_start(masked, end):
    """Start of the callee expression that ends right before `end` (an identifier, possibly
    qualified and with template arguments, e.g. ns::kern<T, 4>)."""
    i = end
    while True:
        while i > 0 and masked[i - 1].isspace():
            i -= 1
        if i > 0 and masked[i - 1] == ">":  # template argument list
            depth = 0
            j = i - 1
            while j >= 0:
                if masked[j] == ">":
                    depth += 1
                elif masked[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            i = j
            continue
        j = i
        while j > 0 and (masked[j - 1].isalnum() or masked[j - 1] == "_"):
            j -= 1
        if j == i:
            raise RewriteError("cannot find the kernel before <<<")
        i = j
        if masked[i - 2:i] == "::":
            i -= 2
            continue
        return i


def rewrite_launches(text, masked, edits):
    for m in re.finditer(r"<<<", masked):
        close = masked.find(">>>", m.end())
        if close < 0:
            raise RewriteError(f"line {line_of(text, m.start())}: <<< without >>>")
        paren = close + 3
        while paren < len(masked) and masked[paren].isspace():
            paren += 1
        if paren >= len(masked) or masked[paren] != "(":
            raise RewriteError(f"line {line_of(text, m.start())}: expected ( after >>>")
        start = callee_start(masked, m.start())
        callee = text[start:m.start()].strip()
        config = text[m.end():close]
        new = f"::emu::launch({callee}, {config})("
        edits.append((start, paren + 1, keep_newlines(text[start:paren + 1], new)))


# ---- shared memory --------------------------------------------------------------------------
ALIGN = re.compile(r"__align__\s*\(\s*(\w+)\s*\)")


def rewrite_shared(text, masked, edits):
    for m in re.finditer(r"\b__shared__\b", masked):
        before = masked[:m.start()].rstrip()
        is_extern = before.endswith("extern")
        start = before.rfind("extern") if is_extern else m.start()
        end = masked.find(";", m.end())
        if end < 0:
            raise RewriteError(f"line {line_of(text, m.start())}: __shared__ declaration without ;")
        decl = text[m.end():end]
        align = None
        am = ALIGN.search(decl)
        if am:
            align = am.group(1)
            decl = decl[:am.start()] + decl[am.end():]
        decl = " ".join(decl.split())
        if is_extern:
            dm = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]", decl)
            if not dm:
                raise RewriteError(f"line {line_of(text, m.start())}: unsupported extern __shared__ '{decl}'")
            ty, name = dm.group(1).strip(), dm.group(2)
            new = f"{ty}* const {name} = static_cast<{ty}*>(::emu::dynamic_smem({align or 'alignof(' + ty + ')'}));"
        else:
            new = " ".join(static_shared_decls(decl, align, line_of(text, m.start())))
        edits.append((start, end + 1, keep_newlines(text[start:end + 1], new)))


def static_shared_decls(decl, align, line):
    pieces = [p.strip() for p in split_top_level(decl, ",")]
    first = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)", pieces[0])
    if not first or "=" in decl or "*" in decl or "&" in decl:
        raise RewriteError(f"line {line}: unsupported __shared__ declaration '{decl}'")
    ty = first.group(1).strip()
    out = []
    for k, piece in enumerate(pieces):
        if k == 0:
            name, dims = first.group(2), first.group(3)
        else:
            dm = re.fullmatch(r"([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)", piece)
            if not dm:
                raise RewriteError(f"line {line}: unsupported __shared__ declarator '{piece}'")
            name, dims = dm.group(1), dm.group(2)
        targs = f"{ty}{''.join(dims.split())}" + (f", {align}" if align else "")
        out.append(f'auto& {name} = ::emu::shared_var<{targs}>("{name}", __FILE__, __LINE__);')
    return out


# ---- inline PTX -----------------------------------------------------------------------------
def c_string_value(literals):
    value = ""
    for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', literals):
        value += bytes(lit, "utf-8").decode("unicode_escape")
    return value


def parse_operands(section, line):
    ops = []
    for part in split_top_level(section, ","):
        part = part.strip()
        if not part:
            continue
        om = re.fullmatch(r'"([^"]*)"\s*\((.*)\)', part, re.S)
        if not om:
            raise RewriteError(f"line {line}: unsupported asm operand '{part}'")
        ops.append(f"({om.group(2).strip()})")
    return ops


def ptx_call(instr, operands, line):
    instr = instr.strip()
    if not instr:
        return ""
    head = instr.split(None, 1)
    opcode = head[0]
    if not re.fullmatch(r"[a-z][\w.]*", opcode):
        raise RewriteError(f"line {line}: unsupported PTX '{instr}'")
    args = []
    if len(head) > 1:
        for a in split_top_level(head[1], ","):
            a = a.strip()
            am = re.fullmatch(r"\[?\s*%(\d+)\s*\]?", a)
            if am:
                args.append(operands[int(am.group(1))])
            elif re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", a):
                args.append(a)
            else:
                raise RewriteError(f"line {line}: unsupported PTX operand '{a}' in '{instr}'")
    return f"::emu::ptx::{opcode.replace('.', '_')}({', '.join(args)});"


def rewrite_asm(text, masked, edits):
    for m in re.finditer(r"\b(?:asm|__asm__)\b(\s+(?:volatile|__volatile__))?\s*\(", masked):
        line = line_of(text, m.start())
        close = matching(masked, m.end() - 1)
        end = close + 1
        while end < len(masked) and masked[end].isspace():
            end += 1
        if end >= len(masked) or masked[end] != ";":
            raise RewriteError(f"line {line}: asm statement without ;")
        body = text[m.end():close]
        sections = split_top_level_colons(body)
        template = c_string_value(sections[0])
        operands = []
        for sec in sections[1:3]:
            operands += parse_operands(sec, line)
        calls = [ptx_call(i, operands, line) for i in re.split(r"[;\n]", template)]
        new = " ".join(c for c in calls if c)
        edits.append((m.start(), end + 1, keep_newlines(text[m.start():end + 1], new)))


def split_top_level_colons(body):
    """asm( template : outputs : inputs : clobbers ), where '::' is two separators."""
    return split_top_level(body, ":")


# ---- kernels ---------------------------------------------------------------------------------
def rewrite_kernels(text, masked, edits):
    names = []
    for m in re.finditer(r"\b__global__\b", masked):
        i = m.end()
        name = None
        while True:
            im = IDENT.search(masked, i)
            if not im:
                raise RewriteError(f"line {line_of(text, m.start())}: __global__ without a name")
            j = im.end()
            while j < len(masked) and masked[j].isspace():
                j += 1
            if j < len(masked) and masked[j] == "(":
                if im.group(0) in ("__launch_bounds__", "__align__", "__attribute__", "__declspec"):
                    i = matching(masked, j) + 1
                    continue
                name = im.group(0)
                params_close = matching(masked, j)
                break
            i = im.end()
        k = params_close + 1
        brace = masked.find("{", k)
        semi = masked.find(";", k)
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration
        names.append(name)
        edits.append((brace, brace + 1, '{ ::emu::kernel_entered("' + name + '");'))
    return names


def rewrite_file(src, text):
    try:
        return rewrite_text(src, text)
    except RewriteError as e:
        raise RewriteError(f"{src}: {e}") from None


def rewrite_text(src, text):
    masked = mask_comments_and_strings(text)
    edits = []
    rewrite_asm(text, masked, edits)
    rewrite_launches(text, masked, edits)
    rewrite_shared(text, masked, edits)
    kernels = rewrite_kernels(text, masked, edits)
    edits.sort()
    for a, b in zip(edits, edits[1:]):
        if a[1] > b[0]:
            raise RewriteError(f"{src}: overlapping rewrites at line {line_of(text, b[0])}")
    out, pos = [], 0
    for start, end, new in edits:
        out.append(text[pos:start])
        out.append(new)
        pos = end
    out.append(text[pos:])
    result = "".join(out)
    assert result.count("\n") == text.count("\n"), "a rewrite changed the line count"
    header = f'#include "cuda_emu.h"\n#line 1 "{src}"\n'
    return header + result, kernels


def rewrite_dir(src_dir, out_dir, kernels):
    sources = sorted(p for p in src_dir.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    out_dir.mkdir(parents=True, exist_ok=True)
    siblings = set()
    for src in sources:
        text = src.read_text()
        text_out, names = rewrite_file(str(src), text)
        name = src.name + ".cpp" if src.suffix == ".cu" else src.name
        (out_dir / name).write_text(text_out)
        kernels += [f"{n} {src.name}" for n in names]
        siblings.update(re.findall(r'#\s*include\s*"\.\./([^/"]+)/', text))
    return sources, siblings


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    src_dir, out_dir = pathlib.Path(argv[1]).resolve(), pathlib.Path(argv[2])
    fallback = pathlib.Path(argv[3]).resolve() if len(argv) == 4 else None
    kernels = []
    try:
        sources, siblings = rewrite_dir(src_dir, out_dir, kernels)
        if not any(p.suffix == ".cu" for p in sources):
            print(f"rewrite.py: no .cu files in {src_dir}", file=sys.stderr)
            return 1
        done = set()
        while siblings - done:
            name = sorted(siblings - done)[0]
            done.add(name)
            src = src_dir.parent / name
            if not src.is_dir() and fallback is not None:
                src = fallback / name
            if not src.is_dir():
                print(f"rewrite.py: included folder ../{name} not found", file=sys.stderr)
                return 1
            _, more = rewrite_dir(src, out_dir.parent / name, [])
            siblings |= more
    except RewriteError as e:
        print(f"rewrite.py: {e}", file=sys.stderr)
        return 1
    (out_dir / "kernels.txt").write_text("".join(k + "\n" for k in kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
