# The guest kernel of the kvm target: one loop that runs the host's commands.
#
# The host (harness/kvm/vm.py) loads these bytes at hidden page 0, maps them at
# GUEST_BASE = 0xffffffffc0000000 (upper half, where no program gva reaches) and
# enters at `entry` in 64-bit mode with paging on.  Per-vCPU constants live in
# callee-saved registers for the guest's whole life:
#   rbx  this vCPU's mailbox          r12  this vCPU's 4K window (a gva)
#   r13  the window's PTE (a gva)     r14  this vCPU's root copy (a gva)
#   r15  this vCPU's stack top
# The host writes a command into the mailbox and runs the vCPU; the guest does it
# with ordinary instructions, writes the status and exits with `out`.  (On a host
# that emulates every supervisor instruction, as the one docs/kvm.md measured, these
# run in KVM's emulator; the physical accesses of user_read/user_write run natively.)
#
# A gva access first copies the program's PML4 entry for that gva into this
# vCPU's root copy (the root the CPU really uses: the program's PML4 cannot hold
# the guest's own mapping), reading it through the window, so the walk below the
# root is the program's own tables, walked by KVM.  After the access, the Accessed
# bit KVM's walker set in the copy's entry goes back to the program's (sync_back).
#
# Re-assemble: as --64 -o guest.o guest.s && objcopy -O binary -j .text guest.o guest.bin
# (tests/test_kvm.py checks that guest.bin is exactly that).

        .intel_syntax noprefix
        .code64
        .text

        # Mailbox fields (offsets from rbx); harness/kvm/vm.py has the same numbers.
        .equ MB_CMD,    0
        .equ MB_A1,     8
        .equ MB_A2,    16
        .equ MB_A3,    24
        .equ MB_STATUS,32
        .equ MB_VALUE, 40
        .equ MB_CR2,   48
        .equ MB_CODE,  56
        .equ MB_SAVED, 64      # the guest's own: the PML4 entry sync_pml4e copied

        .equ ST_DONE,  1
        .equ ST_PF,    2
        .equ ST_EXC,   3
        .equ ST_BAD,   4

        .equ REPORT_PORT, 0x10

        # The user windows' table (hidden page 16) and the 2M they map (vm.py: same numbers).
        .equ USER_PT,      0xffffffffc0010000
        .equ USER_WINDOWS, 0xffffffffc0200000

        # A window PTE: present, writable, user, accessed, dirty (NX is bit 63, set below).
        .equ WINDOW_BITS, 0x67

entry:
        jmp     dispatch
done:
        mov     qword ptr [rbx + MB_STATUS], ST_DONE
report:
        out     REPORT_PORT, al
dispatch:
        mov     rax, [rbx + MB_CMD]
        cmp     rax, 3
        je      virt_read
        cmp     rax, 4
        je      virt_write
        cmp     rax, 5
        je      load_cr3
        cmp     rax, 6
        je      invlpg_gva
        cmp     rax, 7
        je      flush_tlb
        cmp     rax, 8
        je      map_only
        mov     qword ptr [rbx + MB_STATUS], ST_BAD
        jmp     report

# (Commands 1 and 2 are gone: physical accesses run at CPL 3, see user_read below.)

# 3: read the word at byte gva a1 under the program's root at gpa a2.
virt_read:
        call    sync_pml4e
        mov     rdi, [rbx + MB_A1]
        mov     rax, [rdi]
        mov     [rbx + MB_VALUE], rax
        call    sync_back
        jmp     done

# 4: write a3 to the word at byte gva a1 under the program's root at gpa a2.
virt_write:
        call    sync_pml4e
        mov     rdi, [rbx + MB_A1]
        mov     rax, [rbx + MB_A3]
        mov     [rdi], rax
        call    sync_back
        jmp     done

# 5: load CR3 with a1 (this vCPU's root copy, or the base root for paging off).
load_cr3:
        mov     rax, [rbx + MB_A1]
        mov     cr3, rax
        jmp     done

# 6: invlpg the page of gva a1.
invlpg_gva:
        mov     rax, [rbx + MB_A1]
        invlpg  [rax]
        jmp     done

# 7: flush this vCPU's TLB: reload CR3.
flush_tlb:
        mov     rax, cr3
        mov     cr3, rax
        jmp     done

# 8: map the page of byte gpa a1 in user window a2 (for user_read/user_write below).
# The user windows are the 512 PTEs of the table at USER_PT, mapping USER_WINDOWS.
map_only:
        mov     rax, [rbx + MB_A1]
        and     rax, -4096
        or      rax, WINDOW_BITS
        bts     rax, 63
        mov     rcx, [rbx + MB_A2]
        mov     rdi, USER_PT
        mov     [rdi + rcx * 8], rax
        shl     rcx, 12
        mov     rdi, USER_WINDOWS
        invlpg  [rdi + rcx]
        jmp     done

# rdi = byte gpa -> rdi = the same byte through this vCPU's window.  Clobbers rax.
map_window:
        mov     rax, rdi
        and     rax, -4096
        or      rax, WINDOW_BITS
        bts     rax, 63
        mov     [r13], rax
        invlpg  [r12]
        and     edi, 0xfff
        add     rdi, r12
        ret

# Copy the program's PML4 entry for gva a1 (root gpa a2) into the root copy, if it differs;
# keep the copied value for sync_back.
sync_pml4e:
        mov     rcx, [rbx + MB_A1]
        shr     rcx, 39
        and     ecx, 511
        mov     rdi, [rbx + MB_A2]
        lea     rdi, [rdi + rcx * 8]
        call    map_window
        mov     rax, [rdi]
        mov     [rbx + MB_SAVED], rax
        cmp     rax, [r14 + rcx * 8]
        je      1f
        mov     [r14 + rcx * 8], rax
1:      ret

# After a gva access that did not fault: if KVM's walker set A in the root copy's entry,
# store the entry into the program's root too (a guest write, logged as KVM logs its
# walker's), unless the access itself rewrote the program's entry (that store came after
# the walk and stays).
sync_back:
        mov     rcx, [rbx + MB_A1]
        shr     rcx, 39
        and     ecx, 511
        mov     rdx, [r14 + rcx * 8]
        cmp     rdx, [rbx + MB_SAVED]
        je      1f
        mov     rdi, [rbx + MB_A2]
        lea     rdi, [rdi + rcx * 8]
        call    map_window
        mov     rax, [rbx + MB_SAVED]
        cmp     rax, [rdi]
        jne     1f
        mov     [rdi], rdx
1:      ret

# Every exception lands here with its vector on the stack (a #PF: then its error code).
exc_common:
        pop     rax
        mov     [rbx + MB_CODE], rax
        cmp     rax, 14
        jne     1f
        pop     rax
        mov     [rbx + MB_CODE], rax
        mov     rax, cr2
        mov     [rbx + MB_CR2], rax
        mov     qword ptr [rbx + MB_STATUS], ST_PF
        jmp     2f
1:      mov     qword ptr [rbx + MB_STATUS], ST_EXC
2:      mov     rsp, r15
        jmp     report

# Physical accesses run at CPL 3, natively, through the user window command 8 mapped (the
# host keeps a page in its window between accesses, so KVM's SPTE for it lives on): the host
# sets CS/SS to ring 3 and enters here with rdi = the word in the window, rsi = the
# doorbell (a page with no memslot), rax = the value to write.  The store to the doorbell
# is an MMIO exit that ends the command and carries rax (the value read) to the host.  On
# a host that emulates every supervisor instruction (docs/kvm.md), ring 3 is the only way
# a guest access reaches KVM's page-fault path.
        .org    0x700
user_read:
        mov     rax, [rdi]
        mov     [rsi], rax
        ud2
        .org    0x710
user_write:
        mov     [rdi], rax
        mov     [rsi], rax
        ud2

# The IDT's 32 handlers, 16 bytes apart from offset 0x800 (the host builds the IDT).
        .org    0x800
        .irp    vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        push    \vector
        jmp     exc_common
        .endr
