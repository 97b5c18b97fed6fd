/* The floor for the start-up and exit-cost benchmarks: the least a VMM can do to run the
 * exitbench PVH guest. Creates a VM with N MiB of memory (no irqchip, no devices), loads the
 * ELF's PT_LOAD segments, enters the PVH entry in 32-bit protected mode and loops on KVM_RUN:
 * the first byte to port 0x3f8 goes to stdout, a write to the Worldvisor call port ends it.
 * With a fourth argument "irqchip" it also creates the in-kernel irqchip and PIT first, as
 * wv must: the difference between the two isolates what the kernel's interrupt controllers
 * cost per exit from what a VMM adds.
 * Usage: bare GUEST.elf CMDLINE MEM_MIB [irqchip].  Built and run by benches/vmm.rs. */
#define _GNU_SOURCE
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define DIE(m) do { perror(m); exit(2); } while (0)

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: %s GUEST.elf CMDLINE MEM_MIB\n", argv[0]); return 2; }
  int fd = open(argv[1], O_RDONLY); if (fd < 0) DIE("open guest");
  struct stat st; fstat(fd, &st);
  uint8_t *img = mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0); if (img == MAP_FAILED) DIE("mmap guest");
  size_t memsz = (size_t)atol(argv[3]) << 20;
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC); if (kvm < 0) DIE("/dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0); if (vm < 0) DIE("KVM_CREATE_VM");
  uint8_t *mem = mmap(0, memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  struct kvm_userspace_memory_region r = { .slot = 0, .memory_size = memsz, .userspace_addr = (uint64_t)mem };
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) DIE("KVM_SET_USER_MEMORY_REGION");
  if (argc > 4 && !strcmp(argv[4], "irqchip")) {
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0)) DIE("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit)) DIE("KVM_CREATE_PIT2");
  }
  Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
  for (int i = 0; i < eh->e_phnum; i++) {
    Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
    if (ph->p_type == PT_LOAD) memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
  }
  /* hvm_start_info at 0x6000: magic, version 1, cmdline at 0x20000 */
  uint32_t *si = (uint32_t *)(mem + 0x6000); si[0] = 0x336ec578; si[1] = 1;
  *(uint64_t *)(mem + 0x6000 + 24) = 0x20000; strcpy((char *)mem + 0x20000, argv[2]);
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0); if (vcpu < 0) DIE("KVM_CREATE_VCPU");
  int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(0, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  struct kvm_sregs s; ioctl(vcpu, KVM_GET_SREGS, &s);
  struct kvm_segment seg = { .base = 0, .limit = 0xffffffff, .present = 1, .s = 1, .db = 1, .g = 1 };
  seg.type = 11; seg.selector = 8; s.cs = seg;
  seg.type = 3; seg.selector = 16; s.ds = s.es = s.fs = s.gs = s.ss = seg;
  s.cr0 = 0x11; s.cr4 = 0; s.efer = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &s)) DIE("KVM_SET_SREGS");
  struct kvm_regs regs = { .rip = eh->e_entry, .rbx = 0x6000, .rflags = 2 };
  if (ioctl(vcpu, KVM_SET_REGS, &regs)) DIE("KVM_SET_REGS");
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) continue;
    if (run->exit_reason == KVM_EXIT_IO) {
      uint8_t *d = (uint8_t *)run + run->io.data_offset;
      if (run->io.port == 0x3f8 && run->io.direction == KVM_EXIT_IO_OUT) { if (write(1, d, 1) < 0) return 2; }
      else if (run->io.port == 0x5756) return 0;
      continue;
    }
    fprintf(stderr, "bare: exit reason %u\n", run->exit_reason);
    return 1;
  }
}
