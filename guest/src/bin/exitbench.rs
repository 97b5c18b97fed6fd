//! The start-up and exit-cost benchmark guest: a PVH ELF that, in 32-bit protected mode with
//! paging off (no set-up at all), writes one byte to the serial port, performs N `out`s to port
//! 0x10 (N is the decimal command line, 0 when absent), then powers off: the Worldvisor call
//! port first, then QEMU's isa-debug-exit (port 0xf4), then a triple fault. It runs unchanged
//! on `wv run`, QEMU's microvm and the bare KVM loop, so all three are measured on one guest.
#![no_std]
#![no_main]

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.head, "ax"
    .code32
    .globl pvh_start
pvh_start:
    mov $0x3f8, %dx
    mov $'!', %al
    out %al, %dx
    /* N from the command line (start_info + 24 = cmdline_paddr, low 32 bits) */
    xor %ecx, %ecx
    mov 24(%ebx), %esi
    test %esi, %esi
    jz 3f
1:  movzbl (%esi), %eax
    sub $'0', %eax
    cmp $9, %eax
    ja 3f
    imul $10, %ecx, %ecx
    add %eax, %ecx
    inc %esi
    jmp 1b
3:  mov $0x10, %dx
    test %ecx, %ecx
    jz 5f
4:  out %al, %dx
    dec %ecx
    jnz 4b
5:  mov $poweroff_block, %eax
    mov $0x5756, %dx
    out %eax, %dx
    xor %eax, %eax
    out %al, $0xf4
    lidt null_idt
    int $3
6:  hlt
    jmp 6b
    .p2align 3
poweroff_block:
    .long 4, 0xffffffff
    .quad 0, 0, 0, 0, 0, 0, 0
null_idt:
    .word 0
    .long 0

    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
