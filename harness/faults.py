"""The fault switch: injectable real-world MMU bugs (``--inject NAME``).

Each catalog entry names a bug from KVM history (its ``source``: a commit id
and subject, or a mailing-list thread's subject, date and lore link; how each
is built: ``docs/faults.md``) and is switched on by a tiny local branch in a
target, ``if faults.active(NAME):``. The active set is the project's only
global mutable state: targets consult it on their hot paths, so it is a plain
frozenset lookup. Nothing in ``fuzz/`` may consult the catalog to steer
generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """One injectable bug: where it lives, where it comes from, what goes wrong."""

    name: str
    target: str
    source: str
    description: str
    concurrent: bool = False


# Threads cited by several faults.
_MERGE_THREAD = ("\"[RFC PATCH v4 13/16] KVM: x86/tdp_mmu: Try to merge pages into a large "
                 "page\" (Isaku Yamahata, 2023-07-25), https://lore.kernel.org/all/"
          "d649f4294d95803a46aaaf3ddd87c7e2f8ff501d.1690323516.git.isaku.yamahata@intel.com/")
_STAGE2_SERIES = ("\"KVM: arm64: Parallel stage-2 fault handling\" (Oliver Upton, 2022-08-30), "
                  "https://lore.kernel.org/kvmarm/20220830194132.962932-1-oliver.upton@linux.dev/")

_TDP_FAULTS = (
    Fault("merge-frozen-child", "tdp",
          _MERGE_THREAD,
          "the private 4K->2M merge in the fault path does not retry on a child another "
          "vCPU has frozen (mirror install: freeze, AUG, write) and populates over it",
          concurrent=True),
    Fault("merge-partial-accept", "tdp",
          _MERGE_THREAD + ": \"merging ... can fail when some sub pages are accepted and some "
          "are not\"",
          "the private merge goes ahead although some subpages are accepted and some "
          "pending; the 2M leaf takes the first page's state"),
    Fault("merge-by-zap", "tdp",
          _MERGE_THREAD + ": \"zapping and re-populating results in zeroing page content\"",
          "the private merge zaps the 4K leaves and refaults at 2M, zeroing accepted contents"),
    Fault("free-before-flush", "tdp",
          "KVM commits 5c359cca1faf (\"KVM: arm64: Tear down unlinked stage-2 subtree after "
          "break-before-make\") and c3119ae45dfb (\"KVM: arm64: Protect stage-2 traversal with "
          "RCU\"), series " + _STAGE2_SERIES + "; on x86, \"KVM: x86/mmu: Protect TDP MMU page "
          "table memory with RCU\" (handle_removed_pt, call_rcu)",
          "a removed table page is freed at once, not after the TLB flush and the RCU grace "
          "period", concurrent=True),
    Fault("huge-over-table-no-flush", "tdp",
          "KVM commit bb95dfb9e2df (\"KVM: x86/mmu: Defer TLB flush to caller when freeing TDP "
          "MMU shadow pages\"): handle_removed_pt no longer flushes, so a caller that unlinks a "
          "table must flush before it leaves its RCU section; tdp_mmu_map_handle_target_level's "
          "kvm_flush_remote_tlbs_gfn after replacing a non-leaf SPTE (range fixed by "
          "1e203847aa92). The same class of bug: 048f49809c52 (\"KVM: x86/mmu: Ensure TLBs are "
          "flushed for TDP MMU during NX zapping\")",
          "the fault path replaces a table with a huge leaf by cmpxchg and omits the flush: "
          "the old table is freed after the grace period while a vCPU may still walk it"),
    Fault("removed-pt-flush-wrong-start", "tdp",
          "KVM commit 574c3c55e969 (\"KVM: x86/mmu: Fix TLB flush range when handling "
          "disconnected pt\"), fixing a066e61f13cf: handle_removed_tdp_mmu_page flushed "
          "KVM_PAGES_PER_HPAGE(level + 1) pages from the last child's gfn, not base_gfn; the "
          "flush has been the caller's since bb95dfb9e2df",
          "with ranged flushes (range_flush=1), the fault path's flush after replacing a table "
          "by a huge leaf starts at the table's last child: the other gfns keep cached "
          "upper-level entries to the removed table"),
    Fault("collapsible-flush-sp-base", "tdp",
          "KVM commit 1b2dc7360463 (\"KVM: x86/mmu: Fix wrong start gfn of tlb flushing with "
          "range\"; Hou Wenlong's series \"Fix wrong gfn range of tlb flushing with range\", "
          "2022), fixing c3134ce240ee: kvm_mmu_zap_collapsible_spte flushed sp->gfn for "
          "KVM_PAGES_PER_HPAGE(sp->role.level) when a ranged flush was available",
          "with ranged flushes (range_flush=1), recovery flushes each table it replaces by a "
          "huge leaf from the table's base gfn for one 4K page instead of the slot after the "
          "walk: the other gfns keep cached upper-level entries to the removed table"),
    Fault("mmio-stale-generation", "tdp",
          "KVM commit ce88decffd17 (\"KVM: MMU: mmio page fault support\"), and the memslot "
          "generation in MMIO SPTEs of \"KVM: MMU: fast invalidate all mmio sptes\" (2013): "
          "check_mmio_spte() in arch/x86/kvm/mmu/mmu.c, Documentation/virt/kvm/x86/mmu.rst "
          "\"Fast invalidation of MMIO sptes\"",
          "MMIO SPTEs are honoured without comparing the memslot generation"),
    Fault("nonpresent-zero", "tdp",
          "KVM commit 803482f472cc (\"KVM: x86/mmu: Use SHADOW_NONPRESENT_VALUE for atomic zap "
          "in TDP MMU\"), fixing 7f01cab84928 (\"KVM: x86/mmu: Allow non-zero value for "
          "non-present SPTE and removed SPTE\"): tdp_mmu_zap_spte_atomic() was missed when "
          "d8fa2031faab (\"KVM: x86/mmu: Replace hardcoded value 0 for the initial value for "
          "SPTE\") converted the zaps (tdp_mmu_zap_leafs, __tdp_mmu_zap_root)",
          "a zap writes 0 instead of SHADOW_NONPRESENT_VALUE after the flush (suppress-#VE "
          "clear): the atomic zap, the zaps under mmu_lock held for write, any of them"),
    Fault("table-init-zero", "tdp",
          "KVM commit d8fa2031faab (\"KVM: x86/mmu: Replace hardcoded value 0 for the initial "
          "value for SPTE\"): mmu_topup_shadow_page_cache fills new shadow pages with "
          "SHADOW_NONPRESENT_VALUE (kvm_init_shadow_page) instead of taking them __GFP_ZERO",
          "a new table page comes zero-filled: every entry the MMU has not written is 0, "
          "suppress-#VE clear"),
    Fault("fault-on-obsolete-root", "tdp",
          "KVM commit a955cad84cda (\"KVM: x86/mmu: Retry page fault if root is invalidated "
          "by memslot update\"): is_page_fault_stale() checks the root under mmu_lock, as the "
          "TDP MMU relies on kvm_mmu_zap_all_fast() marking roots invalid; \"inserting a SPTE "
          "into an obsolete root can leak a SP if kvm_tdp_mmu_zap_invalidated_roots() has "
          "already zapped\" past it",
          "a fault that started on a root zap_all then invalidated does not retry: it "
          "installs into the obsolete root, possibly behind the zap", concurrent=True),
    Fault("convert-no-zap", "tdp",
          "KVM commit 5a475554db1e (\"KVM: Introduce per-page memory attributes\"): "
          "kvm_vm_set_mem_attributes() unmaps the range before changing its attributes",
          "set_attributes updates the attributes but does not zap existing leaves"),
    Fault("mixed-attr-stale", "tdp",
          "KVM commit 90b4fe17981e (\"KVM: x86: Disallow hugepages when memory attributes are "
          "mixed\"): kvm_arch_post_set_memory_attributes() recomputes KVM_LPAGE_MIXED_FLAG",
          "the mixed-attributes flag of a 2M range is not recomputed after a conversion"),
    Fault("convert-no-hugepage-retry", "tdp",
          "KVM commit 9129633d568e (\"KVM: x86/mmu: Prevent installing hugepages when mem "
          "attributes are changing\", Sean Christopherson, 2025; reported by Michael Roth), "
          "fixing 8dd2eee9d526: kvm_arch_pre_set_memory_attributes() adds the partly covered "
          "head and tail hugepages to the invalidation, since the mixed flags change only in "
          "kvm_arch_post_set_memory_attributes()",
          "a conversion of part of a 2M range leaves the rest of the range out of its "
          "invalidation: a fault on an unchanged gfn of the range maps 2M in the window before "
          "the mixed flag is set, over the converted gfns", concurrent=True),
    Fault("accept-level-ignored", "tdp",
          "TDG.MEM.PAGE.ACCEPT returns TDX_PAGE_SIZE_MISMATCH when the mapping is smaller than "
          "the accept level: \"[RFC PATCH v5 09/16] KVM: TDX: Pass desired page level in err "
          "code for page fault handler\" (Xiaoyao Li, 2023-10-16), "
          "https://lore.kernel.org/all/"
          "b37fa7827ab9344eae8c72c5507a49a93b0a2908.1697473009.git.isaku.yamahata@intel.com/",
          "a 2m accept over a range mapped at 4K reports ok and accepts only the first page"),
    Fault("accept-level-not-honored", "tdp",
          "\"[RFC PATCH v5 41/45] KVM: TDX: Honor the guest's accept level contained in an "
          "EPT violation\" (Yan Zhao, TDX huge-page series, posted by Sean Christopherson "
          "2026-01-28), https://lore.kernel.org/all/20260129011517.3545883-42-seanjc@google.com/"
          ": \"if a guest accepts a GFN at a lower level after KVM maps it at a higher level, "
          "the TDX module will synthesize an EPT Violation ... If KVM fails to perform page "
          "splitting ..., the guest's ACCEPT operation will be triggered again ..., causing a "
          "repeated EPT Violation VM-Exit\"",
          "tdx_handle_ept_violation ignores the accept level in the extended exit "
          "qualification: its fault maps the largest level the range allows, so a 4K accept "
          "under (or faulting in) a pending 2M leaf exits again and again"),
    Fault("pending-access-maps", "tdp",
          "KVM commit 02ab57707bdb (\"KVM: TDX: Implement hooks to propagate changes of TDP "
          "MMU mirror page table\"): a fault adds a private page with TDH.MEM.PAGE.AUG, "
          "pending until the guest accepts it; TDH.MEM.PAGE.ADD is for initial memory only "
          "(KVM_TDX_INIT_MEM_REGION)",
          "the fault path adds a pending private page with PAGE.ADD semantics (accepted) "
          "instead of AUG (pending)"),
    Fault("slot-delete-leaf-only", "tdp",
          "KVM commit 4e103134b862 (\"KVM: x86/mmu: Zap only the relevant pages when removing "
          "a memslot\") and its revert d012a06ab1d2",
          "deleting a slot zaps its 4K leaves but not a huge leaf covering it"),
    Fault("dirty-log-keeps-huge", "tdp",
          "KVM commit 7c8a4742c4ab (\"KVM: x86/mmu: Fix write-protection of PTs mapped by the "
          "TDP MMU\"): write-protection skipped SPTEs it had to protect; enabling dirty "
          "logging: kvm_mmu_slot_apply_flags() in arch/x86/kvm/x86.c",
          "enabling dirty logging skips the eager split and write-protects 4K leaves only, "
          "leaving writable huge leaves in place"),
    Fault("fast-pf-ignores-mmu-writable", "tdp",
          "KVM commit c7ba5b48cc8d (\"KVM: MMU: fast path of handling guest page fault\", "
          "Xiao Guangrong, 2012) and its precondition in Documentation/virt/kvm/locking.rst "
          "(\"What we use to avoid all the race is the SPTE_HOST_WRITEABLE bit and "
          "SPTE_MMU_WRITEABLE bit on the spte\"); today's fast_page_fault: \"only SPTEs that "
          "are MMU-writable can be made fully writable outside of mmu_lock\"",
          "fast_page_fault sets Writable on any present leaf a write faulted on, not only "
          "on MMU-writable ones: a read-only memslot's leaf becomes writable and the "
          "guest's write lands instead of exiting to userspace"),
    Fault("dirty-log-rearm-before-harvest", "tdp",
          "KVM commit edde99ce0529 (Michael S. Tsirkin, 2010): GET_DIRTY_LOG "
          "write-protected the slot before swapping out the bitmap, so a fault that made a "
          "page writable in between was logged in the bitmap being returned and the page "
          "stayed writable: \"The rule is that all pages are either dirty in the current "
          "bitmap, or write-protected\"; today's order: kvm_get_dirty_log_protect() "
          "(virt/kvm/kvm_main.c) xchg()s each bitmap word, then "
          "kvm_arch_mmu_enable_log_dirty_pt_masked()",
          "KVM_GET_DIRTY_LOG re-arms the logged gfns (write-protect, or clear the Dirty bit "
          "with PML) before it takes the bitmap: a lockless fast-path fix or a CPU Dirty-bit "
          "set in between is reported now and leaves the page writable (or dirty), so the "
          "next writes to it are never logged", concurrent=True),
    Fault("lost-flush-on-yield", "tdp",
          "KVM commit a835429cda91 (\"KVM: x86/mmu: Ensure TLBs are flushed when yielding "
          "during GFN range zap\")",
          "a long zap that yields (contention or need_resched) drops its pending TLB flush"),
    Fault("invalidate-vs-memslot-race", "tdp",
          "KVM commit 52ac8b358b0c (\"KVM: Block memslot updates across range_start() and "
          "range_end()\")",
          "a fault installs an SPTE between invalidation start and end (mmu_invalidate_seq "
          "not checked)", concurrent=True),
    Fault("clear-dirty-keeps-huge", "tdp",
          "\"[PATCH v3 2/2] KVM: x86: Not wr-protect huge page with init_all_set dirty log\" "
          "(Keqian Zhu, 2021-04-29; queued by Paolo Bonzini 2021-05-24), https://lore.kernel.org/"
          "kvm/20210429034115.35560-3-zhukeqian1@huawei.com/: kvm_mmu_slot_apply_flags stops "
          "write-protecting huge pages when logging starts initially-set, so "
          "kvm_arch_mmu_enable_log_dirty_pt_masked must (\"Huge pages are NOT write protected "
          "when we start dirty log with init-all-set, so we must write protect them at here\")",
          "with initially-set bitmaps, KVM_CLEAR_DIRTY_LOG write-protects (and splits) only "
          "4K leaves: a 2M leaf left writable by the enable takes the next writes unlogged"),
    Fault("clear-dirty-last-word", "tdp",
          "KVM commit 53eac7a8f8cf (\"KVM: fix KVM_CLEAR_DIRTY_LOG for memory slots of "
          "unaligned size\"): kvm_clear_dirty_log_protect counted num_pages / BITS_PER_LONG "
          "words, so a range ending at the end of a slot whose size is not a multiple of 64 "
          "lost its partial last word (now DIV_ROUND_UP)",
          "KVM_CLEAR_DIRTY_LOG skips the last, partial 64-page word of a range that reaches the "
          "slot's end: those pages stay dirty and writable, reported again by the next get"),
    Fault("td-mmio-misconfig", "tdp",
          "\"[PATCH v14 032/113] KVM: x86/mmu: Allow non-zero value for non-present SPTE and "
          "removed SPTE\" (Isaku Yamahata, 2023-05, https://lore.kernel.org/kvm/?q=%22Allow+"
          "non-zero+value+for+non-present+SPTE+and+removed+SPTE%22): a TD's MMIO SPTE must "
          "have RWX=0 and suppress-#VE clear "
          "so that the TD gets #VE \"instead of EPT misconfigration unlike VMX case\"; "
          "mainline does it per VM in tdx_vm_init (kvm_mmu_set_mmio_spte_value(kvm, 0)), "
          "and tdx_handle_exit answers an EPT-misconfig TD exit with KVM_BUG_ON",
          "a TD keeps the VMX MMIO SPTE value (write+execute, a misconfiguration): the next "
          "access to a cached MMIO gfn is an EPT-misconfig TD exit"),
    Fault("noslot-before-attributes", "tdp",
          "\"KVM: x86/mmu: Move private vs. shared check above slot validity checks\" (Sean "
          "Christopherson, series \"KVM: x86/mmu: Page fault and MMIO cleanups\", "
          "2024-02-27, https://lore.kernel.org/all/20240228024147.41573-1-seanjc@google.com/): "
          "\"as is, KVM will exit to userspace if there is no memslot\" although the "
          "attributes mismatch",
          "a shared fault on a slot-less gfn whose attribute is private installs an MMIO "
          "SPTE and emulates, instead of the memory-fault exit"),
    Fault("sept-remove-no-track", "tdp",
          "\"KVM: TDX: Handle TLB tracking for TDX\" (Isaku Yamahata, TDX MMU part 2 series, "
          "2024, https://lore.kernel.org/kvm/?q=%22KVM%3A+TDX%3A+Handle+TLB+tracking+for+TDX"
          "%22): tdx_sept_remove_private_spte's \"TDX requires TLB tracking before dropping "
          "private page.  Do it here, although it is also done later.\"; the TDX module fails "
          "TDH.MEM.PAGE.REMOVE with TDX_TLB_TRACKING_NOT_DONE otherwise",
          "removing a private leaf issues RANGE.BLOCK then PAGE.REMOVE with no TDH.MEM.TRACK "
          "between them (the tracking left to the later remote TLB flush)"),
    Fault("sept-busy-no-retry", "tdp",
          "\"KVM: TDX: Kick off vCPUs when SEAMCALL is busy during TD page removal\" (Yan "
          "Zhao, 2025-01, https://lore.kernel.org/kvm/?q=%22Kick+off+vCPUs+when+SEAMCALL+is+"
          "busy%22); before it tdx_sept_zap_private_spte returned -EBUSY on TDX_OPERAND_BUSY "
          "from TDH.MEM.RANGE.BLOCK and remove_external_spte answered with KVM_BUG_ON; "
          "mainline's tdh_do_no_vcpus retries once with every vCPU forced out",
          "a BLOCK/REMOVE that meets a guest TDCALL holding the S-EPT entry (TDX_OPERAND_BUSY) "
          "is not retried: KVM_BUG_ON", concurrent=True),
)

_STAGE2_FAULTS = (
    Fault("stage2-block-before-break", "stage2",
          "KVM commit 5c359cca1faf (\"KVM: arm64: Tear down unlinked stage-2 subtree after "
          "break-before-make\"), Ricardo Koller's review of its patch 02/14 (2022-09-13) in the "
          "series \"KVM: arm64: Parallel stage-2 fault handling\" (Oliver Upton, 2022-08-30), "
          "https://lore.kernel.org/kvmarm/20220830194132.962932-1-oliver.upton@linux.dev/",
          "the map walker's pre-order callback installs the block over a table by cmpxchg, "
          "before the old subtree is made unreachable (locked) and its range invalidated"),
    Fault("stage2-teardown-before-break", "stage2-pkvm",
          "KVM commit 5c359cca1faf (\"KVM: arm64: Tear down unlinked stage-2 subtree after "
          "break-before-make\"): the teardown must follow the break; pKVM frees at once. Series "
          "https://lore.kernel.org/kvmarm/20220830194132.962932-1-oliver.upton@linux.dev/",
          "the map walker's pre-order callback tears the old subtree down before it breaks the "
          "table entry and invalidates its range: hardware walkers still reach freed pages"),
    Fault("stage2-table-break-tlbi-ipa", "stage2",
          "KVM commit 5c359cca1faf (the removed code's own comment: a table has 'numerous leaf "
          "entries below us which would otherwise need invalidating individually'); mainline "
          "stage2_try_break_pte invalidates a table's whole range (kvm_tlb_flush_vmid_range); "
          "cf. 36e008323926 (\"KVM: arm64: Don't pass a TLBI level hint when zapping table "
          "entries\")",
          "breaking a table entry invalidates by IPA only the page the walk is at, leaving the "
          "other leaves of the old table in the TLBs beside the new block"),
    Fault("stage2-range-tlbi-level-zero", "stage2",
          "KVM commit 0f0ff097bf77 (\"KVM: arm64: Use TLBI_TTL_UNKNOWN in "
          "__kvm_tlb_flush_vmid_range()\"), after FEAT_LPA2 made level 0 a valid TTL hint",
          "the range TLBI passes 0 as 'level unknown', which the hardware reads as a level-0 "
          "hint: the page and block entries of the range survive"),
    Fault("stage2-no-reload-after-pre", "stage2-pkvm",
          "KVM commit a9f0e3d5a089 (\"KVM: arm64: Reload PTE after invoking walker callback on "
          "preorder traversal\", kvmarm-fixes-6.4-2): the walker freed a subtree, then walked it",
          "__kvm_pgtable_visit descends into the table it read before the TABLE_PRE callback, "
          "which just replaced it by a block and (pKVM: at once) freed it"),
    Fault("stage2-mmu-seq-after-pfn", "stage2",
          "KVM commit 13ec9308a857 (\"KVM: arm64: Retry fault if vma_lookup() results become "
          "invalid\"): read the MMU notifier seq before the lookup",
          "user_mem_abort snapshots mmu_invalidate_seq after looking up the pfn, so an "
          "invalidation in between goes unseen and the stale pfn is mapped", concurrent=True),
    Fault("stage2-free-unlinked-no-rcu", "stage2",
          "KVM commits c3119ae45dfb (\"KVM: arm64: Protect stage-2 traversal with RCU\": "
          "shared walks run under rcu_read_lock and mmu.c's stage2_free_unlinked_table frees "
          "through call_rcu; posted through v3 as \"KVM: arm64: Free removed stage-2 tables "
          "in RCU callback\") and 5c359cca1faf (\"KVM: arm64: Tear down unlinked stage-2 "
          "subtree after break-before-make\": the teardown is indirected because RCU is not "
          "available to pKVM), applied series https://lore.kernel.org/r/"
          "20221107215644.1895162-1-oliver.upton@linux.dev",
          "a normal VM frees an unlinked subtree at once (pKVM's path) instead of after an RCU "
          "grace period: a concurrent fault's shared walk still inside the old table reads "
          "the freed page", concurrent=True),
)

_SHADOW_FAULTS = (
    Fault("invlpg-keeps-mmio", "shadow",
          "Marcelo Tosatti's review of \"[PATCH v2 21/22] KVM: MMU: mmio page fault support\" "
          "(2011-06-22: \"for shadow you need to remove mmio sptes on invlpg\"), fixed before "
          "merge as KVM commit ce88decffd17",
          "invlpg syncs the shadow-present SPTEs of the gva but skips an MMIO SPTE, so a gva "
          "the guest remapped from MMIO to RAM keeps exiting as MMIO"),
    Fault("sync-zero-check", "shadow",
          "KVM commit 7f01cab84928 (\"KVM: x86/mmu: Allow non-zero value for non-present SPTE "
          "and removed SPTE\"), from Zhi Wang's review (2023-01-25) of \"[PATCH v11 030/113] "
          "KVM: x86/mmu: Replace hardcoded value 0 for the initial value for SPTE\"",
          "kvm_sync_spte tests spt[i] == 0 for an empty entry instead of "
          "SHADOW_NONPRESENT_VALUE, so a non-present entry is synced as if present: "
          "make_spte takes its pfn from the non-present value"),
    Fault("unsync-role-mismatch", "shadow",
          "KVM commit 94c8136448c8 (\"KVM: x86/mmu: Decompose kvm_mmu_get_page() into separate "
          "functions\"), kvm_mmu_find_shadow_page: \"Unsync pages must not be left as is, "
          "because the new upper-level page will be write-protected\"; series "
          "https://lore.kernel.org/all/20220622192710.2547152-1-pbonzini@redhat.com/",
          "creating an upper-level shadow page for a gfn does not zap the unsync pages of "
          "that gfn with another role: an unsync page outlives its gfn's write protection"),
    Fault("shadow-hash-gfn-only", "shadow", "KVM commit 94c8136448c8 (\"KVM: x86/mmu: Decompose kvm_mmu_get_page() into "
          "separate functions\"): kvm_mmu_find_shadow_page matches gfn and role word",
          "kvm_mmu_find_shadow_page matches on gfn alone, not gfn + role word: a shadow page "
          "of another level, directness or access is reused"),
    Fault("inherited-perms", "shadow",
          "KVM commit b1bd5cba3306 (CVE-2021-38198, \"KVM: X86: MMU: Use the correct "
          "inherited permissions to get shadow page\")",
          "FNAME(fetch) gets every intermediate shadow page with the access of the last "
          "non-leaf level instead of the access inherited down to that page"),
    Fault("guest-flush-no-sync", "shadow",
          "KVM commit b53e84eed08b (kvm_vcpu_flush_tlb_guest syncs the shadow roots)",
          "a guest TLB flush does not sync unsync shadow pages (kvm_mmu_sync_roots / "
          "kvm_mmu_sync_prev_roots skipped)"),
    Fault("sync-mmio-refresh", "shadow",
          "mainline FNAME(sync_spte) -> sync_mmio_spte, https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git/tree/arch/x86/kvm/mmu/paging_tmpl.h (found "
          "while building the shadow target; a candidate bug, not reported upstream)",
          "syncing an unsync page re-marks an MMIO SPTE of an older memslot generation with "
          "the current one, so a gfn a new memslot covers keeps exiting as MMIO"),
    Fault("mmio-spte-writable", "shadow",
          "mainline make_spte, https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git/tree/arch/x86/kvm/mmu/spte.c, the \"old SPTE was writable\" shortcut "
          "(is_last_spte(old_spte, level) && is_writable_pte(old_spte)); found by the shadow "
          "soak (seed 9148), a candidate bug, not reported upstream",
          "a 4K MMIO SPTE caching ACC_WRITE counts as a writable leaf, so the SPTE that replaces "
          "it (the gfn got a memslot) skips mmu_try_to_unsync_pages and is writable although "
          "the gfn is a write-tracked guest page table"),
)

CATALOG: dict[str, Fault] = {fault.name: fault for fault in
                            _TDP_FAULTS + _STAGE2_FAULTS + _SHADOW_FAULTS}

_active: frozenset = frozenset()


class UnknownFault(ValueError):
    """A fault name not in :data:`CATALOG`."""


def active(name: str) -> bool:
    """True while fault ``name`` is injected."""
    return name in _active


def check(names) -> frozenset:
    """Validate fault names against the catalog; return them as a set."""
    names = frozenset(n for n in names if n)
    unknown = sorted(names - CATALOG.keys())
    if unknown:
        known = ", ".join(sorted(CATALOG)) or "none"
        raise UnknownFault(f"unknown fault {', '.join(unknown)!s} (known: {known})")
    return names


@contextlib.contextmanager
def injected(names):
    """Inject the named faults for the duration of the ``with`` block."""
    global _active
    previous, _active = _active, check(names)
    try:
        yield
    finally:
        _active = previous
