//! Boot entry points, the GDT, static page tables, interrupt stubs and the AP trampoline.
//!
//! Three ways in, one way on: the 32-bit Linux boot protocol (offset 0 of the image, esi =
//! boot_params), the 64-bit Linux boot protocol (offset 0x200, rsi = boot_params) and PVH
//! (32-bit, paging off, ebx = hvm_start_info). All switch to this image's own GDT and page tables
//! (identity map of the low 4 GiB with 2 MiB pages, built by the assembler: no boot-time loops,
//! which matters when kernel mode is emulated at ~1 us per instruction) and call
//! `probe_main(kind, info)`.

use core::arch::global_asm;

/// Boot protocol identifiers passed to `probe_main`.
pub const BOOT_LINUX32: u32 = 1;
/// 64-bit Linux boot protocol.
pub const BOOT_LINUX64: u32 = 2;
/// PVH.
pub const BOOT_PVH: u32 = 3;

/// Kernel code selector (64-bit).
pub const KERNEL_CS: u16 = 0x08;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

/// Where the AP trampoline is copied (the SIPI vector is this address >> 12).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;

global_asm!(
    r#"
    .section .text.head, "ax"
    .code32
    .globl linux32_start
linux32_start:
    cli
    mov $1, %edi
    jmp common32

    .org 0x200
    .code64
    .globl linux64_start
linux64_start:
    cli
    mov $2, %edi
    lea stack_top(%rip), %rsp
    lgdt gdt_ptr(%rip)
    lea pml4(%rip), %rax
    mov %rax, %cr3
    pushq $0x08
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  jmp long_common

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, %esi
    mov $3, %edi
common32:
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    lgdt gdt_ptr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $0x08, $long_entry32

    .code64
long_entry32:
    mov %esi, %esi
    mov %edi, %edi
long_common:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    lea stack_top(%rip), %rsp
    mov %rdi, %r12
    mov %rsi, %r13
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq
    mov %r12, %rdi
    mov %r13, %rsi
    call probe_main
2:  cli
    hlt
    jmp 2b

    /* Application processors arrive here in 64-bit mode from the trampoline. */
    .globl ap_long_entry
ap_long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov ap_boot_stack(%rip), %rsp
    call ap_main
3:  cli
    hlt
    jmp 3b

    /* The AP trampoline: copied to 0x8000 and started by SIPI in real mode. */
    .globl ap_trampoline_start
    .globl ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    lgdtl %cs:(ap_tramp_gdtr - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x38, $(0x8000 + ap_tramp32 - ap_trampoline_start)
    .code32
ap_tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x08, $ap_long_entry
    .p2align 2
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

    /* Interrupt and exception stubs: push a dummy error code where the CPU pushes none, then
       the vector, then share one path that saves registers and calls interrupt_dispatch. */
    .section .text
    .macro isr_noerr v
    .p2align 4
isr_\v:
    pushq $0
    pushq $\v
    jmp isr_common
    .endm
    .macro isr_err v
    .p2align 4
isr_\v:
    pushq $\v
    jmp isr_common
    .endm
    isr_noerr 0
    isr_noerr 1
    isr_noerr 2
    isr_noerr 3
    isr_noerr 4
    isr_noerr 5
    isr_noerr 6
    isr_noerr 7
    isr_err 8
    isr_noerr 9
    isr_err 10
    isr_err 11
    isr_err 12
    isr_err 13
    isr_err 14
    isr_noerr 15
    isr_noerr 16
    isr_err 17
    isr_noerr 18
    isr_noerr 19
    isr_noerr 20
    isr_err 21
    isr_noerr 22
    isr_noerr 23
    isr_noerr 24
    isr_noerr 25
    isr_noerr 26
    isr_noerr 27
    isr_noerr 28
    isr_err 29
    isr_err 30
    isr_noerr 31
    /* Vectors 32..255 share one stub each of 16 bytes: isr_ext + 16 * (v - 32). */
    .p2align 4
    .globl isr_ext_base
isr_ext_base:
    .set v, 32
    .rept 224
    .p2align 4
    pushq $0
    pushq $v
    jmp isr_common
    .set v, v + 1
    .endr

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call interrupt_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .p2align 3
    .globl isr_table
isr_table:
    .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7
    .quad isr_8, isr_9, isr_10, isr_11, isr_12, isr_13, isr_14, isr_15
    .quad isr_16, isr_17, isr_18, isr_19, isr_20, isr_21, isr_22, isr_23
    .quad isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30, isr_31

    /* enter_user(rip, rsp) -> u64: drops to CPL3 at rip/rsp; returns when the user code traps
       back (int 0x80 or an exception) through leave_user(value). */
    .section .text
    .globl enter_user
enter_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, kernel_saved_rsp(%rip)
    pushq $0x1b
    push %rsi
    pushq $0x202
    pushq $0x23
    push %rdi
    mov $0x1b, %ax
    mov %ax, %ds
    mov %ax, %es
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    iretq

    .globl leave_user
leave_user:
    mov $0x10, %cx
    mov %cx, %ds
    mov %cx, %es
    mov %rdi, %rax
    mov kernel_saved_rsp(%rip), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

    .section .data.pagetables, "aw"
    .p2align 12
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x7
    .quad pd1 + 0x7
    .quad pd2 + 0x7
    .quad pd3 + 0x7
    .fill 508, 8, 0
pd0:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd1:
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd2:
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd3:
    .rept 512
    .quad (i << 21) | 0x9f
    .set i, i + 1
    .endr

    .section .data, "aw"
    .p2align 4
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff   /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff   /* 0x10 kernel data */
    .quad 0x00cff2000000ffff   /* 0x18 user data */
    .quad 0x00affa000000ffff   /* 0x20 user code, 64-bit */
    .globl gdt_tss
gdt_tss:
    .quad 0                    /* 0x28 TSS, filled at run time */
    .quad 0
    .quad 0x00cf9a000000ffff   /* 0x38 kernel code, 32-bit (AP trampoline) */
gdt_end:
    .p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .bss
    .p2align 3
    .globl ap_boot_stack
ap_boot_stack:
    .quad 0
kernel_saved_rsp:
    .quad 0

    .section .stack, "aw", @nobits
    .p2align 12
    .space 32768
    .globl stack_top
stack_top:

    /* PVH entry point note (XEN_ELFNOTE_PHYS32_ENTRY = 18). */
    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start
    .text
"#,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static mut ap_boot_stack: u64;
    static isr_table: [u64; 32];
    static isr_ext_base: u8;
    static mut gdt_tss: [u64; 2];
    fn enter_user(rip: u64, rsp: u64) -> u64;
    fn leave_user(value: u64) -> !;
}

/// The AP trampoline's bytes (to be copied to [`TRAMPOLINE_ADDR`]).
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols are defined by the assembly above, in one section, start before end.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let end = &raw const ap_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Sets the stack the next AP starts on.
pub fn set_ap_stack(top: u64) {
    // SAFETY: only the BSP writes this, before it sends the SIPI that makes one AP read it.
    unsafe { core::ptr::write_volatile(&raw mut ap_boot_stack, top) }
}

/// Address of the stub for `vector`.
pub fn isr_address(vector: u8) -> u64 {
    if vector < 32 {
        // SAFETY: the table is 32 entries of addresses, written by the assembler.
        unsafe { isr_table[vector as usize] }
    } else {
        (&raw const isr_ext_base) as u64 + 16 * (u64::from(vector) - 32)
    }
}

/// Writes the TSS descriptor for a TSS at `base` with `limit`.
pub fn set_tss_descriptor(base: u64, limit: u32) {
    let low = u64::from(limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89u64 << 40)
        | ((u64::from(limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    // SAFETY: the descriptor slot is only written here, before `ltr`, by the BSP at boot or by
    // one AP at a time while the BSP waits for it (smp::start_aps).
    unsafe {
        let p = &raw mut gdt_tss;
        (*p)[0] = low;
        (*p)[1] = high;
    }
}

/// Runs user code at CPL3 until it comes back (`int3` with the value in rax, or a trap
/// handled through [`return_to_kernel`]); returns that value.
pub fn run_user(rip: u64, rsp: u64) -> u64 {
    // SAFETY: enter_user saves the callee-saved registers and the kernel stack pointer and only
    // comes back through leave_user, which restores them; user code and stack are mapped.
    unsafe { enter_user(rip, rsp) }
}

/// Abandons the current interrupt frame and returns from [`run_user`] with `value`.
pub fn return_to_kernel(value: u64) -> ! {
    // SAFETY: only called from an interrupt taken while run_user is active (checked by caller).
    unsafe { leave_user(value) }
}
