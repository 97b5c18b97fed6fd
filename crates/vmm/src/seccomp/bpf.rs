//! The seccomp lists' classic-BPF code generator: turns a [`super::List`] into a program that
//! checks the architecture, finds the call number by a balanced binary search (O(log n)
//! comparisons on every path, where seccompiler's chains made one per listed call) and then
//! checks the call's arguments, if it has any conditions. Calls without conditions end in the
//! search at `SECCOMP_RET_ALLOW`, so the kernel's always-allowed cache (Linux 5.11+, built by
//! running the program for every call number when it is installed) records them cheaply.
//!
//! Semantics are seccompiler's (what the lists were written against, and what the unit test
//! compares with, call by call): the wrong architecture kills the process, a call outside the
//! list or whose argument patterns all fail traps, `Dword` compares an argument's low 32 bits,
//! `Qword` all 64, `MaskedEq(m)` compares `arg & m` with `value & m`. In log mode calls made
//! from the gate address pass whatever they are; that check is made only on the way to a
//! refusal, so that allowed calls stay constant for the kernel's cache.

use std::collections::BTreeMap;

/// One classic-BPF instruction, as `seccomp(2)` takes it.
pub(crate) type Insn = libc::sock_filter;

/// The longest program the kernel accepts (BPF_MAXINSNS).
pub(crate) const MAX_INSNS: usize = 4096;

/// How much of an argument a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Width {
    /// The low 32 bits (the kernel's `int` and `unsigned int` arguments).
    Dword,
    /// All 64 bits.
    Qword,
}

/// A condition's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    /// `arg == value`.
    Eq,
    /// `arg & mask == value & mask`.
    MaskedEq(u64),
}

/// One condition on an argument: (index 0-5, width, comparison, value).
pub(crate) type Cond = (u8, Width, Cmp, u64);

/// Per system call, either any arguments (`None`) or the argument patterns (each a list of
/// conditions that must all hold) of which one must match.
pub(crate) type Rules = BTreeMap<i64, Option<Vec<Vec<Cond>>>>;

pub(crate) const BPF_LD: u16 = 0x00;
pub(crate) const BPF_ALU: u16 = 0x04;
pub(crate) const BPF_JMP: u16 = 0x05;
pub(crate) const BPF_RET: u16 = 0x06;
pub(crate) const BPF_W: u16 = 0x00;
pub(crate) const BPF_ABS: u16 = 0x20;
pub(crate) const BPF_AND: u16 = 0x50;
pub(crate) const BPF_JA: u16 = 0x00;
pub(crate) const BPF_JEQ: u16 = 0x10;
pub(crate) const BPF_JGT: u16 = 0x20;
pub(crate) const BPF_K: u16 = 0x00;

pub(crate) const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub(crate) const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
pub(crate) const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
/// `AUDIT_ARCH_X86_64` (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
pub(crate) const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// `struct seccomp_data`: nr (int), arch (u32), instruction_pointer (u64), args (u64 x 6);
/// each 64-bit field little-endian (low half first).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const IP_OFFSET: u32 = 8;
const ARGS_OFFSET: u32 = 16;

/// The low 32 bits of `v`.
pub(crate) fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// The high 32 bits of `v`.
fn high32(v: u64) -> u32 {
    low32(v >> 32)
}

/// A place in the program, resolved when it is laid out.
type Label = usize;

/// Where a conditional jump goes.
#[derive(Clone, Copy)]
enum Tgt {
    /// The instruction after it.
    Next,
    /// A label.
    At(Label),
}

/// One instruction before layout.
enum Item {
    /// A load, an ALU operation or a return: `(code, k)`.
    Stmt(u16, u32),
    /// `ja label` (32-bit offset).
    Ja(Label),
    /// A conditional jump; `far_*` when that branch goes through a `ja` trampoline placed right
    /// after it (the 8-bit offset does not reach).
    Jmp {
        op: u16,
        k: u32,
        jt: Tgt,
        jf: Tgt,
        far_t: bool,
        far_f: bool,
    },
    /// A label's place (no instruction).
    Place(Label),
}

impl Item {
    fn size(&self) -> usize {
        match self {
            Item::Stmt(..) | Item::Ja(_) => 1,
            Item::Jmp { far_t, far_f, .. } => 1 + usize::from(*far_t) + usize::from(*far_f),
            Item::Place(_) => 0,
        }
    }
}

/// A classic-BPF assembler with forward labels; jumps that 8 bits cannot reach get trampolines.
#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        self.labels - 1
    }

    fn place(&mut self, l: Label) {
        self.items.push(Item::Place(l));
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.items.push(Item::Stmt(code, k));
    }

    fn load(&mut self, offset: u32) {
        self.stmt(BPF_LD | BPF_W | BPF_ABS, offset);
    }

    fn ret(&mut self, k: u32) {
        self.stmt(BPF_RET | BPF_K, k);
    }

    fn ja(&mut self, l: Label) {
        self.items.push(Item::Ja(l));
    }

    fn jmp(&mut self, op: u16, k: u32, jt: Tgt, jf: Tgt) {
        self.items.push(Item::Jmp {
            op,
            k,
            jt,
            jf,
            far_t: false,
            far_f: false,
        });
    }

    /// Lays the program out: positions, then trampolines for the branches that do not reach,
    /// until none is missing (a trampoline only lengthens jumps, so this ends).
    fn finish(mut self) -> Result<Vec<Insn>, String> {
        loop {
            let (pos, at) = self.positions()?;
            let mut changed = false;
            for (i, item) in self.items.iter_mut().enumerate() {
                let size = item.size();
                if let Item::Jmp {
                    jt,
                    jf,
                    far_t,
                    far_f,
                    ..
                } = item
                {
                    let p = pos[i];
                    for (t, far) in [(*jt, far_t), (*jf, far_f)] {
                        if *far {
                            continue;
                        }
                        let target = match t {
                            Tgt::Next => p + size,
                            Tgt::At(l) => at[l],
                        };
                        if target < p + 1 {
                            return Err("a jump backwards (a generator bug)".into());
                        }
                        if target - (p + 1) > 255 {
                            *far = true;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                return self.emit(&pos, &at);
            }
        }
    }

    /// Each item's position and each label's.
    fn positions(&self) -> Result<(Vec<usize>, Vec<usize>), String> {
        let mut pos = Vec::with_capacity(self.items.len());
        let mut at = vec![usize::MAX; self.labels];
        let mut p = 0;
        for item in &self.items {
            pos.push(p);
            if let Item::Place(l) = item {
                at[*l] = p;
            }
            p += item.size();
        }
        if at.contains(&usize::MAX) {
            return Err("a label never placed (a generator bug)".into());
        }
        if p > MAX_INSNS {
            return Err(format!(
                "{p} BPF instructions, more than the kernel's limit of {MAX_INSNS}"
            ));
        }
        Ok((pos, at))
    }

    fn emit(&self, pos: &[usize], at: &[usize]) -> Result<Vec<Insn>, String> {
        let ins = |code, jt, jf, k| Insn { code, jt, jf, k };
        let offset = |from: usize, to: usize| {
            to.checked_sub(from + 1)
                .ok_or_else(|| "a jump backwards (a generator bug)".to_string())
        };
        let mut out = Vec::with_capacity(pos.last().copied().unwrap_or(0) + 1);
        for (i, item) in self.items.iter().enumerate() {
            let p = pos[i];
            match item {
                Item::Stmt(code, k) => out.push(ins(*code, 0, 0, *k)),
                Item::Place(_) => {}
                Item::Ja(l) => {
                    let off = u32::try_from(offset(p, at[*l])?).map_err(|e| e.to_string())?;
                    out.push(ins(BPF_JMP | BPF_JA, 0, 0, off));
                }
                Item::Jmp {
                    op,
                    k,
                    jt,
                    jf,
                    far_t,
                    far_f,
                } => {
                    let size = item.size();
                    let target = |t: &Tgt| match t {
                        Tgt::Next => p + size,
                        Tgt::At(l) => at[*l],
                    };
                    // Trampolines right after the jump: the true branch's first.
                    let short = |far: bool, slot: usize, t: &Tgt| -> Result<u8, String> {
                        let off = if far { slot } else { offset(p, target(t))? };
                        u8::try_from(off)
                            .map_err(|_| "a jump out of reach (a generator bug)".into())
                    };
                    let jt8 = short(*far_t, 0, jt)?;
                    let jf8 = short(*far_f, usize::from(*far_t), jf)?;
                    out.push(ins(BPF_JMP | op | BPF_K, jt8, jf8, *k));
                    let mut q = p + 1;
                    for (far, t) in [(*far_t, jt), (*far_f, jf)] {
                        if far {
                            let off =
                                u32::try_from(offset(q, target(t))?).map_err(|e| e.to_string())?;
                            out.push(ins(BPF_JMP | BPF_JA, 0, 0, off));
                            q += 1;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// A balanced binary search of `keys` (sorted, distinct) for the accumulator: on a key, to
    /// its label; on none, to `miss`.
    fn search(&mut self, keys: &[(u32, Label)], miss: Label) {
        match keys {
            [] => self.ja(miss),
            [(k, l)] => self.jmp(BPF_JEQ, *k, Tgt::At(*l), Tgt::At(miss)),
            _ => {
                let mid = keys.len() / 2;
                let right = self.label();
                self.jmp(BPF_JGT, keys[mid - 1].0, Tgt::At(right), Tgt::Next);
                self.search(&keys[..mid], miss);
                self.place(right);
                self.search(&keys[mid..], miss);
            }
        }
    }

    /// One condition: falls through when it holds, else goes to `fail`.
    fn cond(&mut self, &(arg, width, cmp, value): &Cond, fail: Label) -> Result<(), String> {
        if arg > 5 {
            return Err(format!("argument {arg}: system calls have six (0-5)"));
        }
        let base = ARGS_OFFSET + 8 * u32::from(arg);
        let (mask, value) = match cmp {
            Cmp::Eq => (u64::MAX, value),
            Cmp::MaskedEq(m) => (m, value & m),
        };
        let mut halves = vec![(base, low32(mask), low32(value))];
        if width == Width::Qword {
            halves.insert(0, (base + 4, high32(mask), high32(value)));
        }
        for (offset, m, v) in halves {
            // A half the mask leaves out always compares equal (value & 0 == 0).
            if m == 0 {
                continue;
            }
            self.load(offset);
            if m != u32::MAX {
                self.stmt(BPF_ALU | BPF_AND | BPF_K, m);
            }
            self.jmp(BPF_JEQ, v, Tgt::Next, Tgt::At(fail));
        }
        Ok(())
    }

    /// A call's argument checks: to `allow` when one pattern holds, else to `refuse`.
    fn patterns(&mut self, pats: &[Vec<Cond>], allow: Label, refuse: Label) -> Result<(), String> {
        // Every pattern one equality on the same argument (ioctl requests, fcntl commands,
        // socket families): one load and a search of the values.
        if let Some(&[(arg, width, Cmp::Eq, _)]) = pats.first().map(Vec::as_slice) {
            let same = |p: &Vec<Cond>| matches!(p.as_slice(), &[(a, w, Cmp::Eq, _)] if a == arg && w == width);
            let values: Vec<u64> = pats.iter().map(|p| p[0].3).collect();
            let one_high = values.iter().all(|v| high32(*v) == high32(values[0]));
            if arg <= 5 && pats.iter().all(same) && (width == Width::Dword || one_high) {
                let base = ARGS_OFFSET + 8 * u32::from(arg);
                if width == Width::Qword {
                    self.load(base + 4);
                    self.jmp(BPF_JEQ, high32(values[0]), Tgt::Next, Tgt::At(refuse));
                }
                self.load(base);
                let mut keys: Vec<u32> = values.iter().map(|v| low32(*v)).collect();
                keys.sort_unstable();
                keys.dedup();
                let keys: Vec<(u32, Label)> = keys.into_iter().map(|k| (k, allow)).collect();
                self.search(&keys, refuse);
                return Ok(());
            }
        }
        for (i, pat) in pats.iter().enumerate() {
            let next = if i + 1 == pats.len() {
                refuse
            } else {
                self.label()
            };
            for c in pat {
                self.cond(c, next)?;
            }
            self.ja(allow);
            if next != refuse {
                self.place(next);
            }
        }
        if pats.is_empty() {
            self.ja(allow);
        }
        Ok(())
    }

    /// Log mode's way out before a refusal: calls from the gate (the address after its
    /// `syscall` instruction) allowed, others on.
    fn gate(&mut self, gate: u64) {
        let other = self.label();
        self.load(IP_OFFSET);
        self.jmp(BPF_JEQ, low32(gate), Tgt::Next, Tgt::At(other));
        self.load(IP_OFFSET + 4);
        self.jmp(BPF_JEQ, high32(gate), Tgt::Next, Tgt::At(other));
        self.ret(SECCOMP_RET_ALLOW);
        self.place(other);
    }
}

/// The program for `rules`: the wrong architecture kills, a listed call whose arguments match
/// is allowed, anything else traps; with `log_gate`, calls from that address are allowed
/// instead of refused.
pub(crate) fn generate(rules: &Rules, log_gate: Option<u64>) -> Result<Vec<Insn>, String> {
    let mut a = Asm::default();
    let (allow, trap, bad_arch) = (a.label(), a.label(), a.label());
    a.load(ARCH_OFFSET);
    a.jmp(BPF_JEQ, AUDIT_ARCH_X86_64, Tgt::Next, Tgt::At(bad_arch));
    a.load(NR_OFFSET);
    let mut keys = Vec::with_capacity(rules.len());
    let mut blocks = Vec::new();
    for (nr, pats) in rules {
        let k = u32::try_from(*nr).map_err(|_| format!("system call number {nr} out of range"))?;
        match pats {
            Some(p) if !p.is_empty() => {
                let l = a.label();
                keys.push((k, l));
                blocks.push((l, p));
            }
            _ => keys.push((k, allow)),
        }
    }
    a.search(&keys, trap);
    for (l, pats) in blocks {
        a.place(l);
        a.patterns(pats, allow, trap)?;
    }
    a.place(allow);
    a.ret(SECCOMP_RET_ALLOW);
    a.place(trap);
    if let Some(g) = log_gate {
        a.gate(g);
    }
    a.ret(SECCOMP_RET_TRAP);
    a.place(bad_arch);
    if let Some(g) = log_gate {
        a.gate(g);
    }
    a.ret(SECCOMP_RET_KILL_PROCESS);
    a.finish()
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{gate_address, Kind, SeccompMode};
    use super::*;
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// The program seccompiler makes of `rules`, with the log mode's gate check in front: what
    /// `List::compile` built before this generator (the reference it must agree with).
    pub(crate) fn seccompiler_program(rules: &Rules, log_gate: Option<u64>) -> Vec<Insn> {
        let mut map = BTreeMap::new();
        for (nr, pats) in rules {
            let mut out = Vec::new();
            for conds in pats.clone().unwrap_or_default() {
                let conds = conds
                    .into_iter()
                    .map(|(arg, len, op, v)| {
                        let len = match len {
                            Width::Dword => SeccompCmpArgLen::Dword,
                            Width::Qword => SeccompCmpArgLen::Qword,
                        };
                        let op = match op {
                            Cmp::Eq => SeccompCmpOp::Eq,
                            Cmp::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
                        };
                        SeccompCondition::new(arg, len, op, v).unwrap()
                    })
                    .collect();
                out.push(SeccompRule::new(conds).unwrap());
            }
            map.insert(*nr, out);
        }
        let filter = SeccompFilter::new(
            map,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let prog: BpfProgram = filter.try_into().unwrap();
        let ins = |code, jt, jf, k| Insn { code, jt, jf, k };
        let mut out = Vec::new();
        if let Some(ip) = log_gate {
            let ld = |off| ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, off);
            out.extend([
                ld(IP_OFFSET),
                ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, low32(ip)),
                ld(IP_OFFSET + 4),
                ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, high32(ip)),
                ins(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW),
            ]);
        }
        out.extend(prog.iter().map(|i| ins(i.code, i.jt, i.jf, i.k)));
        out
    }

    /// `struct seccomp_data`.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Data {
        pub(crate) nr: i32,
        pub(crate) arch: u32,
        pub(crate) ip: u64,
        pub(crate) args: [u64; 6],
    }

    impl Data {
        /// The 32-bit word at byte `off`, as `BPF_LD | BPF_W | BPF_ABS` reads it.
        fn word(&self, off: u32) -> u32 {
            let field = |v: u64, o: u32| if o == 0 { low32(v) } else { high32(v) };
            match off {
                0 => self.nr as u32,
                4 => self.arch,
                8 | 12 => field(self.ip, off - 8),
                16..=60 if off.is_multiple_of(4) => {
                    let i = usize::try_from((off - 16) / 8).unwrap();
                    field(self.args[i], (off - 16) % 8)
                }
                _ => panic!("a load outside seccomp_data (offset {off})"),
            }
        }
    }

    /// Runs `prog` on `d` as the kernel's classic BPF does (the instructions the generators
    /// emit; any other fails the test): its return value and how many instructions ran.
    pub(crate) fn run(prog: &[Insn], d: &Data) -> (u32, usize) {
        let mut a = 0u32;
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            let i = prog.get(pc).expect("ran off the program's end");
            steps += 1;
            pc += 1;
            let cond = |c: bool| usize::from(if c { i.jt } else { i.jf });
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => a = d.word(i.k),
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
                c if c == BPF_JMP | BPF_JA => pc += usize::try_from(i.k).unwrap(),
                c if c == BPF_JMP | BPF_JEQ | BPF_K => pc += cond(a == i.k),
                c if c == BPF_JMP | BPF_JGT | BPF_K => pc += cond(a > i.k),
                // BPF_JGE, BPF_JSET.
                c if c == BPF_JMP | 0x30 | BPF_K => pc += cond(a >= i.k),
                c if c == BPF_JMP | 0x40 | BPF_K => pc += cond(a & i.k != 0),
                c if c == BPF_RET | BPF_K => return (i.k, steps),
                c => panic!("instruction {c:#x} at {} not interpreted", pc - 1),
            }
        }
    }

    /// Argument values on and around each condition's boundaries.
    fn candidates<'a>(conds: impl Iterator<Item = &'a Cond>) -> Vec<u64> {
        let mut base = vec![0, 1, u64::MAX, u64::from(u32::MAX), 1 << 32];
        for &(_, _, cmp, v) in conds {
            base.push(v);
            if let Cmp::MaskedEq(m) = cmp {
                base.extend([v & m, v | !m, m, !m]);
                base.extend(
                    (0..64)
                        .filter(|b| m & (1 << b) != 0)
                        .map(|b| (v & m) ^ (1 << b)),
                );
            }
        }
        let mut out: Vec<u64> = base
            .iter()
            .flat_map(|&b| {
                [
                    b,
                    b.wrapping_add(1),
                    b.wrapping_sub(1),
                    b | 0xffff_ffff_0000_0000,
                    b ^ (1 << 32),
                    u64::from(low32(b)),
                ]
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Argument vectors for a call: every candidate in every argument at once, and each
    /// pattern satisfied with one of its arguments replaced by each candidate.
    fn vectors(pats: Option<&Vec<Vec<Cond>>>, cands: &[u64]) -> Vec<[u64; 6]> {
        let mut out: Vec<[u64; 6]> = cands.iter().map(|&c| [c; 6]).collect();
        for pat in pats.into_iter().flatten() {
            let mut hit = [0u64; 6];
            for &(arg, _, _, v) in pat {
                hit[usize::from(arg)] = v;
            }
            out.push(hit);
            for &(arg, ..) in pat {
                for &c in cands {
                    let mut v = hit;
                    v[usize::from(arg)] = c;
                    out.push(v);
                }
            }
        }
        out
    }

    const ARCHS: [u32; 4] = [AUDIT_ARCH_X86_64, 0x4000_0003, 0xc000_00b7, 0];

    /// The call numbers tried: every one up to 512, and some out of range (x32's, negative).
    fn numbers() -> Vec<i32> {
        let mut nrs: Vec<i32> = (0..512).collect();
        nrs.extend([
            -1,
            i32::MIN,
            i32::MAX,
            1000,
            0x4000_0000,
            0x4000_0001,
            0x4000_0010,
        ]);
        nrs.extend([0x4000_003b, 0x4000_0200, 0x4000_0201]);
        nrs
    }

    /// Runs both programs on every input of the brief and compares; returns which results
    /// were seen (so that a test cannot pass vacuously).
    fn compare(what: &str, rules: &Rules, gate: Option<u64>) -> Vec<u32> {
        let old = seccompiler_program(rules, gate);
        let new = generate(rules, gate).unwrap();
        let g = gate.unwrap_or(0x7f00_1234_5678);
        let ips = [
            g,
            g + 1,
            g - 1,
            g ^ (1 << 32),
            u64::from(low32(g)),
            0,
            u64::MAX,
        ];
        let all = candidates(rules.values().flatten().flatten().flatten());
        let mut seen = Vec::new();
        let mut check = |d: Data| {
            let (a, _) = run(&old, &d);
            let (b, _) = run(&new, &d);
            assert_eq!(a, b, "{what}: {d:x?}: seccompiler {a:#x}, generated {b:#x}");
            if !seen.contains(&a) {
                seen.push(a);
            }
        };
        for nr in numbers() {
            let pats = i64::from(nr);
            let pats = rules.get(&pats).and_then(Option::as_ref);
            for arch in ARCHS {
                for ip in ips {
                    for args in [[0; 6], [u64::MAX; 6]] {
                        check(Data { nr, arch, ip, args });
                    }
                }
            }
            let own = pats.map(|p| candidates(p.iter().flatten()));
            for args in vectors(pats, own.as_deref().unwrap_or(&all)) {
                for ip in [g, 0] {
                    check(Data {
                        nr,
                        arch: AUDIT_ARCH_X86_64,
                        ip,
                        args,
                    });
                }
            }
        }
        seen
    }

    #[test]
    fn every_kind_gives_seccompilers_verdicts() {
        for k in Kind::ALL {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                let gate = (mode == SeccompMode::Log).then(gate_address);
                let seen = compare(&format!("{} {mode:?}", k.name()), &k.list().0, gate);
                for r in [SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP] {
                    assert!(seen.contains(&r), "{}: never {r:#x}", k.name());
                }
                // Log mode lets the gate through even on the wrong architecture.
                if mode == SeccompMode::Kill {
                    assert!(seen.contains(&SECCOMP_RET_KILL_PROCESS), "{}", k.name());
                }
            }
        }
    }

    /// A list too long for 8-bit jumps (trampolines) with every kind of condition.
    #[test]
    fn far_jumps_give_seccompilers_verdicts() {
        let mut rules = Rules::new();
        for nr in 0..200i64 {
            let v = u64::try_from(nr).unwrap();
            let pats = match nr % 4 {
                0 => None,
                1 => Some(vec![
                    vec![(1, Width::Dword, Cmp::Eq, v)],
                    vec![(1, Width::Dword, Cmp::Eq, v + 0x1_0000_0007)],
                ]),
                2 => Some(vec![
                    vec![
                        (0, Width::Qword, Cmp::Eq, v << 33),
                        (2, Width::Qword, Cmp::MaskedEq(6), 2),
                    ],
                    vec![(
                        5,
                        Width::Qword,
                        Cmp::MaskedEq(0xf0_0000_00f0),
                        0x10_0000_0020,
                    )],
                    vec![(3, Width::Dword, Cmp::MaskedEq(0x1_0000_0001), 1)],
                ]),
                _ => Some(vec![
                    vec![(4, Width::Qword, Cmp::Eq, v)],
                    vec![(4, Width::Qword, Cmp::Eq, v + 9)],
                ]),
            };
            rules.insert(nr, pats);
        }
        let new = generate(&rules, None).unwrap();
        assert!(new.len() > 600, "{} instructions: no far jumps", new.len());
        for gate in [None, Some(0x5555_0000_1000)] {
            compare("far jumps", &rules, gate);
        }
    }

    #[test]
    fn an_empty_list_refuses_everything() {
        let seen = compare("empty", &Rules::new(), None);
        assert!(!seen.contains(&SECCOMP_RET_ALLOW));
    }

    #[test]
    fn bad_lists_are_errors() {
        let mut r = Rules::new();
        r.insert(-1, None);
        assert!(generate(&r, None).is_err());
        let mut r = Rules::new();
        r.insert(1, Some(vec![vec![(6, Width::Dword, Cmp::Eq, 0)]]));
        assert!(generate(&r, None).is_err());
    }

    /// An argument-free allowed call runs the architecture check, the search and the return:
    /// a trampoline at most besides (the log mode's gate check is only on refusals).
    #[test]
    fn allowed_calls_take_a_logarithmic_path() {
        for k in Kind::ALL {
            let rules = k.list().0;
            let depth = usize::try_from(rules.len().next_power_of_two().trailing_zeros()).unwrap();
            for gate in [None, Some(gate_address())] {
                let prog = generate(&rules, gate).unwrap();
                for (nr, pats) in &rules {
                    if pats.is_some() {
                        continue;
                    }
                    let d = Data {
                        nr: i32::try_from(*nr).unwrap(),
                        arch: AUDIT_ARCH_X86_64,
                        ip: 0,
                        args: [0; 6],
                    };
                    let (r, steps) = run(&prog, &d);
                    assert_eq!(r, SECCOMP_RET_ALLOW);
                    assert!(
                        steps <= 3 + depth + 1 + 1 + 1,
                        "{} nr {nr}: {steps} steps",
                        k.name()
                    );
                }
            }
        }
    }
}
