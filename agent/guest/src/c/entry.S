/*
 * Test-guest entry points. Everything here runs at CPL0, which the PVM host emulates at
 * about a million instructions per second, so the 64-bit path is kept to a couple of
 * dozen instructions and all tables are built at assembly time.
 */
#include "ncga.h"

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UCODE 0x18
#define SEL_UDATA 0x20
#define SEL_TSS   0x28

/* 104-byte TSS + 8 KiB I/O bitmap + terminator byte, minus one. */
#define TSS_LIMIT (104 + 8192 + 1 - 1)

#define PTE_P_RW_US 0x07
#define PTE_PS      0x80

#define CR0_PE (1 << 0)
#define CR0_MP (1 << 1)
#define CR0_EM (1 << 2)
#define CR0_PG (1 << 31)
#define CR4_PAE        (1 << 5)
#define CR4_OSFXSR     (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER 0xc0000080
#define EFER_SCE (1 << 0)
#define EFER_LME (1 << 8)

/* IOPL=3 so the CPL3 workload can reach its ports; IF=0 because there is no IDT. */
#define USER_RFLAGS 0x3002

	.section .text.entry, "ax"

/*
 * 64-bit entry (ELF e_entry, the NovaCron VMM): long mode, CPL0, flat CS=0x08 and
 * DS/ES/SS=0x10 (the same selectors as our GDT), a 4 GiB identity map with US set
 * everywhere, RBX = hvm_start_info.
 */
	.code64
	.globl nc_entry64
	.type nc_entry64, @function
nc_entry64:
	lgdt nc_gdt_ptr(%rip)
nc_common64:
	mov $nc_kstack_top, %esp
	/* The TSS base has to be split across the descriptor; only the linker knows it. */
	mov $nc_tss, %eax
	mov %ax, nc_gdt + SEL_TSS + 2(%rip)
	shr $16, %eax
	mov %al, nc_gdt + SEL_TSS + 4(%rip)
	mov %ah, nc_gdt + SEL_TSS + 7(%rip)
	mov $SEL_TSS, %eax
	ltr %ax
	pushq $(SEL_UDATA | 3)
	pushq $(nc_ustack_top - 8)	/* as if a return address had been pushed */
	pushq $USER_RFLAGS
	pushq $(SEL_UCODE | 3)
	pushq $nc_guest_main
	mov %rbx, %rdi
	iretq
	.size nc_entry64, . - nc_entry64

/*
 * PVH 32-bit entry (QEMU -kernel): protected mode, paging off, EBX = hvm_start_info.
 * Switch to long mode on the static identity map below and join the 64-bit path.
 */
	.code32
	.globl nc_entry32
	.type nc_entry32, @function
nc_entry32:
	/*
	 * Firmware (SeaBIOS) leaves the PIT interrupt unmasked, and PVM runs user mode with
	 * IF=1 whatever RFLAGS says; with no IDT any interrupt would triple-fault.
	 */
	mov $0xff, %al
	out %al, $0x21
	out %al, $0xa1
	mov $nc_pml4, %eax
	mov %eax, %cr3
	mov $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
	mov %eax, %cr4
	mov $MSR_EFER, %ecx
	rdmsr
	or $(EFER_LME | EFER_SCE), %eax
	wrmsr
	mov %cr0, %eax
	and $~CR0_EM, %eax
	or $(CR0_PG | CR0_MP | CR0_PE), %eax
	mov %eax, %cr0
	lgdt nc_gdt_ptr
	ljmp $SEL_KCODE, $nc_entry32_long
	.code64
nc_entry32_long:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	/* The upper halves of the GPRs are undefined after the mode switch. */
	mov %ebx, %ebx
	jmp nc_common64
	.size nc_entry32, . - nc_entry32

/* PVH entry advertisement, read by QEMU from the PT_NOTE segment. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4				/* namesz */
	.long 4				/* descsz */
	.long NCGA_XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.balign 4
	.long nc_entry32

	.section .data
	.balign 16
nc_gdt:
	.quad 0				/* null */
	.quad 0x00af9a000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00affa000000ffff	/* 0x18 user code, 64-bit, DPL3 */
	.quad 0x00cff2000000ffff	/* 0x20 user data, DPL3 */
	.quad 0x0000890000000000 + TSS_LIMIT	/* 0x28 64-bit TSS; base patched at entry */
	.quad 0
nc_gdt_end:

	.balign 8
	.word 0				/* aligns the base for the 64-bit lgdt */
nc_gdt_ptr:
	.word nc_gdt_end - nc_gdt - 1
	.quad nc_gdt

	/*
	 * RSP0 gives a future interrupt from CPL3 a stack. The all-zero I/O permission
	 * bitmap grants every port to CPL3 on top of IOPL=3: PVM runs user mode with the
	 * hardware IOPL forced to 0, traps port I/O as #GP and lets KVM's emulator decide,
	 * which consults this bitmap (the virtual IOPL does not survive the switch).
	 */
	.balign 16
	.globl nc_tss
nc_tss:
	.long 0
	.quad nc_kstack_top		/* rsp0 */
	.quad 0, 0			/* rsp1, rsp2 */
	.quad 0				/* reserved */
	.quad 0, 0, 0, 0, 0, 0, 0	/* ist1..7 */
	.quad 0				/* reserved */
	.word 0				/* reserved */
	.word nc_tss_iomap - nc_tss	/* I/O map base */
nc_tss_iomap:
	.fill 8192, 1, 0		/* ports 0..0xffff allowed */
	.byte 0xff			/* required terminator */
nc_tss_end:

	/* Identity map of 4 GiB with 2 MiB pages, used only by the PVH path. */
	.balign 4096
nc_pml4:
	.quad nc_pdpt + PTE_P_RW_US
	.fill 511, 8, 0
nc_pdpt:
	.quad nc_pd + PTE_P_RW_US
	.quad nc_pd + 0x1000 + PTE_P_RW_US
	.quad nc_pd + 0x2000 + PTE_P_RW_US
	.quad nc_pd + 0x3000 + PTE_P_RW_US
	.fill 508, 8, 0
nc_pd:
	.set nc_pde, 0
	.rept 2048
	.quad (nc_pde << 21) | PTE_PS | PTE_P_RW_US
	.set nc_pde, nc_pde + 1
	.endr

	/* Stacks live outside .bss so that the C side can zero .bss while running on them. */
	.section .stack, "aw", @nobits
	.balign 4096
	.space 4096
	.globl nc_kstack_top
nc_kstack_top:
	.space 65536
	.globl nc_ustack_top
nc_ustack_top:

	.section .note.GNU-stack, "", @progbits
