/* Prints the virtio layouts and constants of the Linux uapi headers as
 * key=value lines, for tests/test_wire_c_headers.py to compare with
 * virtio_lm.wire.  Keys: "sizeof.<struct>", "<struct>.<field>" (offsetof),
 * "vring_size.<num>.<align>", "need_event.<event>.<new>.<old>", and macro
 * names for constants.  Macros that only newer headers define are printed
 * only when defined. */
#include <stddef.h>
#include <stdio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_pci.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_net.h>
#include <linux/if_ether.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#define SZ(type) printf("sizeof.%s=%zu\n", #type, sizeof(struct type))
#define OFF(type, field) printf("%s.%s=%zu\n", #type, #field, offsetof(struct type, field))
#define K(name) printf("%s=%lld\n", #name, (long long)(name))

int main(void)
{
	/* ---------------------------------------------------------- ring */
	SZ(vring_desc);
	OFF(vring_desc, addr);
	OFF(vring_desc, len);
	OFF(vring_desc, flags);
	OFF(vring_desc, next);
	SZ(vring_avail);
	OFF(vring_avail, flags);
	OFF(vring_avail, idx);
	OFF(vring_avail, ring);
	SZ(vring_used_elem);
	OFF(vring_used_elem, id);
	OFF(vring_used_elem, len);
	SZ(vring_used);
	OFF(vring_used, flags);
	OFF(vring_used, idx);
	OFF(vring_used, ring);
	K(VRING_DESC_F_NEXT);
	K(VRING_DESC_F_WRITE);
	K(VRING_DESC_F_INDIRECT);
	K(VRING_USED_F_NO_NOTIFY);
	K(VRING_AVAIL_F_NO_INTERRUPT);
	K(VRING_DESC_ALIGN_SIZE);
	K(VRING_AVAIL_ALIGN_SIZE);
	K(VRING_USED_ALIGN_SIZE);
	K(VIRTIO_RING_F_INDIRECT_DESC);
	K(VIRTIO_RING_F_EVENT_IDX);
	{
		static const unsigned aligns[] = {2, 4, 16, 64, 4096};
		for (unsigned num = 1; num <= 32768; num <<= 1)
			for (size_t a = 0; a < sizeof aligns / sizeof aligns[0]; a++)
				printf("vring_size.%u.%u=%u\n", num, aligns[a], vring_size(num, aligns[a]));
	}
	{
		static const unsigned v[] = {0, 1, 2, 3, 0x7fff, 0x8000, 0x8001, 0xfffe, 0xffff};
		const size_t n = sizeof v / sizeof v[0];
		for (size_t e = 0; e < n; e++)
			for (size_t w = 0; w < n; w++)
				for (size_t o = 0; o < n; o++)
					printf("need_event.%u.%u.%u=%d\n", v[e], v[w], v[o],
					       vring_need_event(v[e], v[w], v[o]) ? 1 : 0);
	}

	/* ---------------------------------------------------------- config, ids */
	K(VIRTIO_CONFIG_S_ACKNOWLEDGE);
	K(VIRTIO_CONFIG_S_DRIVER);
	K(VIRTIO_CONFIG_S_DRIVER_OK);
	K(VIRTIO_CONFIG_S_FEATURES_OK);
	K(VIRTIO_CONFIG_S_NEEDS_RESET);
	K(VIRTIO_CONFIG_S_FAILED);
	K(VIRTIO_F_VERSION_1);
	K(VIRTIO_F_ACCESS_PLATFORM);
	K(VIRTIO_F_RING_PACKED);
	K(VIRTIO_F_IN_ORDER);
	K(VIRTIO_F_ORDER_PLATFORM);
	K(VIRTIO_F_SR_IOV);
#ifdef VIRTIO_F_NOTIFICATION_DATA
	K(VIRTIO_F_NOTIFICATION_DATA);
#endif
#ifdef VIRTIO_F_NOTIF_CONFIG_DATA
	K(VIRTIO_F_NOTIF_CONFIG_DATA);
#endif
#ifdef VIRTIO_F_RING_RESET
	K(VIRTIO_F_RING_RESET);
#endif
#ifdef VIRTIO_F_ADMIN_VQ
	K(VIRTIO_F_ADMIN_VQ);
#endif
	K(VIRTIO_ID_NET);
	K(VIRTIO_ID_BLOCK);

	/* ---------------------------------------------------------- pci */
	SZ(virtio_pci_cap);
	OFF(virtio_pci_cap, cap_vndr);
	OFF(virtio_pci_cap, cap_next);
	OFF(virtio_pci_cap, cap_len);
	OFF(virtio_pci_cap, cfg_type);
	OFF(virtio_pci_cap, bar);
	OFF(virtio_pci_cap, id);
	OFF(virtio_pci_cap, padding);
	OFF(virtio_pci_cap, offset);
	OFF(virtio_pci_cap, length);
	SZ(virtio_pci_cap64);
	OFF(virtio_pci_cap64, offset_hi);
	OFF(virtio_pci_cap64, length_hi);
	SZ(virtio_pci_notify_cap);
	OFF(virtio_pci_notify_cap, notify_off_multiplier);
	K(VIRTIO_PCI_CAP_VNDR);
	K(VIRTIO_PCI_CAP_NEXT);
	K(VIRTIO_PCI_CAP_LEN);
	K(VIRTIO_PCI_CAP_CFG_TYPE);
	K(VIRTIO_PCI_CAP_BAR);
	K(VIRTIO_PCI_CAP_OFFSET);
	K(VIRTIO_PCI_CAP_LENGTH);
	K(VIRTIO_PCI_NOTIFY_CAP_MULT);
	K(VIRTIO_PCI_CAP_COMMON_CFG);
	K(VIRTIO_PCI_CAP_NOTIFY_CFG);
	K(VIRTIO_PCI_CAP_ISR_CFG);
	K(VIRTIO_PCI_CAP_DEVICE_CFG);
	K(VIRTIO_PCI_CAP_PCI_CFG);
	K(VIRTIO_PCI_CAP_SHARED_MEMORY_CFG);
#ifdef VIRTIO_PCI_CAP_VENDOR_CFG
	K(VIRTIO_PCI_CAP_VENDOR_CFG);
#endif
	K(VIRTIO_PCI_ISR_CONFIG);
	K(VIRTIO_MSI_NO_VECTOR);
	SZ(virtio_pci_common_cfg);
	OFF(virtio_pci_common_cfg, device_feature_select);
	OFF(virtio_pci_common_cfg, device_feature);
	OFF(virtio_pci_common_cfg, guest_feature_select);
	OFF(virtio_pci_common_cfg, guest_feature);
	OFF(virtio_pci_common_cfg, msix_config);
	OFF(virtio_pci_common_cfg, num_queues);
	OFF(virtio_pci_common_cfg, device_status);
	OFF(virtio_pci_common_cfg, config_generation);
	OFF(virtio_pci_common_cfg, queue_select);
	OFF(virtio_pci_common_cfg, queue_size);
	OFF(virtio_pci_common_cfg, queue_msix_vector);
	OFF(virtio_pci_common_cfg, queue_enable);
	OFF(virtio_pci_common_cfg, queue_notify_off);
	OFF(virtio_pci_common_cfg, queue_desc_lo);
	OFF(virtio_pci_common_cfg, queue_desc_hi);
	OFF(virtio_pci_common_cfg, queue_avail_lo);
	OFF(virtio_pci_common_cfg, queue_avail_hi);
	OFF(virtio_pci_common_cfg, queue_used_lo);
	OFF(virtio_pci_common_cfg, queue_used_hi);
	K(VIRTIO_PCI_COMMON_DFSELECT);
	K(VIRTIO_PCI_COMMON_DF);
	K(VIRTIO_PCI_COMMON_GFSELECT);
	K(VIRTIO_PCI_COMMON_GF);
	K(VIRTIO_PCI_COMMON_MSIX);
	K(VIRTIO_PCI_COMMON_NUMQ);
	K(VIRTIO_PCI_COMMON_STATUS);
	K(VIRTIO_PCI_COMMON_CFGGENERATION);
	K(VIRTIO_PCI_COMMON_Q_SELECT);
	K(VIRTIO_PCI_COMMON_Q_SIZE);
	K(VIRTIO_PCI_COMMON_Q_MSIX);
	K(VIRTIO_PCI_COMMON_Q_ENABLE);
	K(VIRTIO_PCI_COMMON_Q_NOFF);
	K(VIRTIO_PCI_COMMON_Q_DESCLO);
	K(VIRTIO_PCI_COMMON_Q_DESCHI);
	K(VIRTIO_PCI_COMMON_Q_AVAILLO);
	K(VIRTIO_PCI_COMMON_Q_AVAILHI);
	K(VIRTIO_PCI_COMMON_Q_USEDLO);
	K(VIRTIO_PCI_COMMON_Q_USEDHI);
#ifdef VIRTIO_PCI_COMMON_Q_NDATA
	K(VIRTIO_PCI_COMMON_Q_NDATA);
#endif
#ifdef VIRTIO_PCI_COMMON_Q_RESET
	K(VIRTIO_PCI_COMMON_Q_RESET);
#endif

	/* ---------------------------------------------------------- blk */
	K(VIRTIO_BLK_F_SIZE_MAX);
	K(VIRTIO_BLK_F_SEG_MAX);
	K(VIRTIO_BLK_F_GEOMETRY);
	K(VIRTIO_BLK_F_RO);
	K(VIRTIO_BLK_F_BLK_SIZE);
	K(VIRTIO_BLK_F_FLUSH);
	K(VIRTIO_BLK_F_TOPOLOGY);
	K(VIRTIO_BLK_F_CONFIG_WCE);
	K(VIRTIO_BLK_F_MQ);
	K(VIRTIO_BLK_F_DISCARD);
	K(VIRTIO_BLK_F_WRITE_ZEROES);
#ifdef VIRTIO_BLK_F_LIFETIME
	K(VIRTIO_BLK_F_LIFETIME);
#endif
	K(VIRTIO_BLK_F_SECURE_ERASE);
	K(VIRTIO_BLK_T_IN);
	K(VIRTIO_BLK_T_OUT);
	K(VIRTIO_BLK_T_FLUSH);
	K(VIRTIO_BLK_T_GET_ID);
#ifdef VIRTIO_BLK_T_GET_LIFETIME
	K(VIRTIO_BLK_T_GET_LIFETIME);
#endif
	K(VIRTIO_BLK_T_DISCARD);
	K(VIRTIO_BLK_T_WRITE_ZEROES);
	K(VIRTIO_BLK_T_SECURE_ERASE);
	K(VIRTIO_BLK_S_OK);
	K(VIRTIO_BLK_S_IOERR);
	K(VIRTIO_BLK_S_UNSUPP);
	K(VIRTIO_BLK_ID_BYTES);
	K(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	SZ(virtio_blk_outhdr);
	OFF(virtio_blk_outhdr, type);
	OFF(virtio_blk_outhdr, ioprio);
	OFF(virtio_blk_outhdr, sector);
	SZ(virtio_blk_discard_write_zeroes);
	OFF(virtio_blk_discard_write_zeroes, sector);
	OFF(virtio_blk_discard_write_zeroes, num_sectors);
	OFF(virtio_blk_discard_write_zeroes, flags);
	/* the config up to the secure-erase fields (later headers append zoned fields) */
	printf("sizeof.virtio_blk_config_through_secure_erase=%zu\n",
	       offsetof(struct virtio_blk_config, secure_erase_sector_alignment) + 4);
	OFF(virtio_blk_config, capacity);
	OFF(virtio_blk_config, size_max);
	OFF(virtio_blk_config, seg_max);
	OFF(virtio_blk_config, geometry.cylinders);
	OFF(virtio_blk_config, geometry.heads);
	OFF(virtio_blk_config, geometry.sectors);
	OFF(virtio_blk_config, blk_size);
	OFF(virtio_blk_config, physical_block_exp);
	OFF(virtio_blk_config, alignment_offset);
	OFF(virtio_blk_config, min_io_size);
	OFF(virtio_blk_config, opt_io_size);
	OFF(virtio_blk_config, wce);
	OFF(virtio_blk_config, unused);
	OFF(virtio_blk_config, num_queues);
	OFF(virtio_blk_config, max_discard_sectors);
	OFF(virtio_blk_config, max_discard_seg);
	OFF(virtio_blk_config, discard_sector_alignment);
	OFF(virtio_blk_config, max_write_zeroes_sectors);
	OFF(virtio_blk_config, max_write_zeroes_seg);
	OFF(virtio_blk_config, write_zeroes_may_unmap);
	OFF(virtio_blk_config, unused1);
	OFF(virtio_blk_config, max_secure_erase_sectors);
	OFF(virtio_blk_config, max_secure_erase_seg);
	OFF(virtio_blk_config, secure_erase_sector_alignment);

	/* ---------------------------------------------------------- net */
	K(VIRTIO_NET_F_CSUM);
	K(VIRTIO_NET_F_GUEST_CSUM);
	K(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
	K(VIRTIO_NET_F_MTU);
	K(VIRTIO_NET_F_MAC);
	K(VIRTIO_NET_F_GUEST_TSO4);
	K(VIRTIO_NET_F_GUEST_TSO6);
	K(VIRTIO_NET_F_GUEST_ECN);
	K(VIRTIO_NET_F_GUEST_UFO);
	K(VIRTIO_NET_F_HOST_TSO4);
	K(VIRTIO_NET_F_HOST_TSO6);
	K(VIRTIO_NET_F_HOST_ECN);
	K(VIRTIO_NET_F_HOST_UFO);
	K(VIRTIO_NET_F_MRG_RXBUF);
	K(VIRTIO_NET_F_STATUS);
	K(VIRTIO_NET_F_CTRL_VQ);
	K(VIRTIO_NET_F_CTRL_RX);
	K(VIRTIO_NET_F_CTRL_VLAN);
	K(VIRTIO_NET_F_CTRL_RX_EXTRA);
	K(VIRTIO_NET_F_GUEST_ANNOUNCE);
	K(VIRTIO_NET_F_MQ);
	K(VIRTIO_NET_F_CTRL_MAC_ADDR);
	K(VIRTIO_NET_F_NOTF_COAL);
	K(VIRTIO_NET_F_HASH_REPORT);
	K(VIRTIO_NET_F_RSS);
	K(VIRTIO_NET_F_RSC_EXT);
	K(VIRTIO_NET_F_STANDBY);
	K(VIRTIO_NET_F_SPEED_DUPLEX);
	K(VIRTIO_NET_S_LINK_UP);
	K(VIRTIO_NET_S_ANNOUNCE);
	K(VIRTIO_NET_HDR_F_NEEDS_CSUM);
	K(VIRTIO_NET_HDR_F_DATA_VALID);
	K(VIRTIO_NET_HDR_F_RSC_INFO);
	K(VIRTIO_NET_HDR_GSO_NONE);
	K(VIRTIO_NET_HDR_GSO_TCPV4);
	K(VIRTIO_NET_HDR_GSO_UDP);
	K(VIRTIO_NET_HDR_GSO_TCPV6);
#ifdef VIRTIO_NET_HDR_GSO_UDP_L4
	K(VIRTIO_NET_HDR_GSO_UDP_L4);
#endif
	K(VIRTIO_NET_HDR_GSO_ECN);
	K(VIRTIO_NET_OK);
	K(VIRTIO_NET_ERR);
	K(VIRTIO_NET_CTRL_RX);
	K(VIRTIO_NET_CTRL_RX_PROMISC);
	K(VIRTIO_NET_CTRL_RX_ALLMULTI);
	K(VIRTIO_NET_CTRL_RX_ALLUNI);
	K(VIRTIO_NET_CTRL_RX_NOMULTI);
	K(VIRTIO_NET_CTRL_RX_NOUNI);
	K(VIRTIO_NET_CTRL_RX_NOBCAST);
	K(VIRTIO_NET_CTRL_MAC);
	K(VIRTIO_NET_CTRL_MAC_TABLE_SET);
	K(VIRTIO_NET_CTRL_MAC_ADDR_SET);
	K(VIRTIO_NET_CTRL_VLAN);
	K(VIRTIO_NET_CTRL_VLAN_ADD);
	K(VIRTIO_NET_CTRL_VLAN_DEL);
	K(VIRTIO_NET_CTRL_ANNOUNCE);
	K(VIRTIO_NET_CTRL_ANNOUNCE_ACK);
	K(VIRTIO_NET_CTRL_MQ);
	K(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
	K(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN);
	K(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX);
	K(VIRTIO_NET_CTRL_MQ_RSS_CONFIG);
	K(VIRTIO_NET_CTRL_MQ_HASH_CONFIG);
	K(VIRTIO_NET_CTRL_GUEST_OFFLOADS);
	K(VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET);
	K(VIRTIO_NET_CTRL_NOTF_COAL);
	SZ(virtio_net_hdr_v1);
	OFF(virtio_net_hdr_v1, flags);
	OFF(virtio_net_hdr_v1, gso_type);
	OFF(virtio_net_hdr_v1, hdr_len);
	OFF(virtio_net_hdr_v1, gso_size);
	OFF(virtio_net_hdr_v1, csum_start);
	OFF(virtio_net_hdr_v1, csum_offset);
	OFF(virtio_net_hdr_v1, num_buffers);
	SZ(virtio_net_config);
	OFF(virtio_net_config, mac);
	OFF(virtio_net_config, status);
	OFF(virtio_net_config, max_virtqueue_pairs);
	OFF(virtio_net_config, mtu);
	OFF(virtio_net_config, speed);
	OFF(virtio_net_config, duplex);
	OFF(virtio_net_config, rss_max_key_size);
	OFF(virtio_net_config, rss_max_indirection_table_length);
	OFF(virtio_net_config, supported_hash_types);
	K(ETH_ALEN);
	K(ETH_HLEN);
	K(ETH_ZLEN);
	K(ETH_P_IP);
	K(ETH_P_ARP);
	K(ETH_P_RARP);
	K(ETH_P_8021Q);
	/* ---------------------------------------------------------- pci_regs.h */
	K(PCI_CFG_SPACE_SIZE);
	K(PCI_CFG_SPACE_EXP_SIZE);
	K(PCI_STD_HEADER_SIZEOF);
	K(PCI_VENDOR_ID);
	K(PCI_DEVICE_ID);
	K(PCI_COMMAND);
	K(PCI_STATUS);
	K(PCI_REVISION_ID);
	K(PCI_CLASS_PROG);
	K(PCI_CLASS_DEVICE);
	K(PCI_CACHE_LINE_SIZE);
	K(PCI_LATENCY_TIMER);
	K(PCI_HEADER_TYPE);
	K(PCI_BIST);
	K(PCI_BASE_ADDRESS_0);
	K(PCI_BASE_ADDRESS_5);
	K(PCI_CARDBUS_CIS);
	K(PCI_SUBSYSTEM_VENDOR_ID);
	K(PCI_SUBSYSTEM_ID);
	K(PCI_ROM_ADDRESS);
	K(PCI_CAPABILITY_LIST);
	K(PCI_INTERRUPT_LINE);
	K(PCI_INTERRUPT_PIN);
	K(PCI_MIN_GNT);
	K(PCI_MAX_LAT);
	K(PCI_COMMAND_IO);
	K(PCI_COMMAND_MEMORY);
	K(PCI_COMMAND_MASTER);
	K(PCI_COMMAND_PARITY);
	K(PCI_COMMAND_SERR);
	K(PCI_COMMAND_INTX_DISABLE);
	K(PCI_STATUS_CAP_LIST);
	K(PCI_HEADER_TYPE_NORMAL);
	K(PCI_BASE_ADDRESS_SPACE_IO);
	K(PCI_BASE_ADDRESS_MEM_TYPE_64);
	K(PCI_BASE_ADDRESS_MEM_PREFETCH);
	K(PCI_CAP_LIST_ID);
	K(PCI_CAP_LIST_NEXT);
	K(PCI_CAP_ID_VNDR);
	K(PCI_CAP_ID_EXP);
	K(PCI_CAP_ID_MSIX);
	K(PCI_MSIX_FLAGS);
	K(PCI_MSIX_FLAGS_QSIZE);
	K(PCI_MSIX_FLAGS_MASKALL);
	K(PCI_MSIX_FLAGS_ENABLE);
	K(PCI_MSIX_TABLE);
	K(PCI_MSIX_PBA);
	K(PCI_MSIX_FLAGS_BIRMASK);
	K(PCI_CAP_MSIX_SIZEOF);
	K(PCI_MSIX_ENTRY_SIZE);
	K(PCI_EXP_FLAGS);
	K(PCI_EXP_FLAGS_VERS);
	K(PCI_EXP_FLAGS_TYPE);
	K(PCI_EXP_TYPE_ENDPOINT);
	K(PCI_EXP_DEVCAP);
	K(PCI_EXP_DEVCAP_FLR);
	K(PCI_EXP_DEVCTL);
	K(PCI_EXP_DEVCTL_BCR_FLR);
	K(PCI_EXP_DEVSTA);
	K(PCI_EXP_LNKCAP);
	K(PCI_EXP_DEVCAP2);
	K(PCI_EXP_DEVCTL2);
	K(PCI_CAP_EXP_ENDPOINT_SIZEOF_V2);
	K(PCI_EXT_CAP_ID_SRIOV);
	K(PCI_SRIOV_CAP);
	K(PCI_SRIOV_CTRL);
	K(PCI_SRIOV_CTRL_VFE);
	K(PCI_SRIOV_CTRL_VFM);
	K(PCI_SRIOV_CTRL_INTR);
	K(PCI_SRIOV_CTRL_MSE);
	K(PCI_SRIOV_CTRL_ARI);
	K(PCI_SRIOV_STATUS);
	K(PCI_SRIOV_INITIAL_VF);
	K(PCI_SRIOV_TOTAL_VF);
	K(PCI_SRIOV_NUM_VF);
	K(PCI_SRIOV_FUNC_LINK);
	K(PCI_SRIOV_VF_OFFSET);
	K(PCI_SRIOV_VF_STRIDE);
	K(PCI_SRIOV_VF_DID);
	K(PCI_SRIOV_SUP_PGSIZE);
	K(PCI_SRIOV_SYS_PGSIZE);
	K(PCI_SRIOV_BAR);
	K(PCI_SRIOV_VFM);
	K(PCI_EXT_CAP_SRIOV_SIZEOF);
	K(PCI_EXT_CAP_ID(0x12345678));
	K(PCI_EXT_CAP_VER(0x12345678));
	K(PCI_EXT_CAP_NEXT(0x12345678));
	SZ(virtio_pci_cfg_cap);
	OFF(virtio_pci_cfg_cap, pci_cfg_data);
	/* ---------------------------------------------------------- vfio.h (vfio-user reuses it) */
	K(VFIO_DEVICE_FLAGS_RESET);
	K(VFIO_DEVICE_FLAGS_PCI);
	K(VFIO_REGION_INFO_FLAG_READ);
	K(VFIO_REGION_INFO_FLAG_WRITE);
	K(VFIO_REGION_INFO_FLAG_MMAP);
	K(VFIO_REGION_INFO_FLAG_CAPS);
	K(VFIO_IRQ_INFO_EVENTFD);
	K(VFIO_IRQ_INFO_MASKABLE);
	K(VFIO_IRQ_INFO_AUTOMASKED);
	K(VFIO_IRQ_INFO_NORESIZE);
	K(VFIO_IRQ_SET_DATA_NONE);
	K(VFIO_IRQ_SET_DATA_BOOL);
	K(VFIO_IRQ_SET_DATA_EVENTFD);
	K(VFIO_IRQ_SET_ACTION_MASK);
	K(VFIO_IRQ_SET_ACTION_UNMASK);
	K(VFIO_IRQ_SET_ACTION_TRIGGER);
	K(VFIO_IRQ_SET_DATA_TYPE_MASK);
	K(VFIO_IRQ_SET_ACTION_TYPE_MASK);
	K(VFIO_DEVICE_FEATURE_MASK);
	K(VFIO_DEVICE_FEATURE_GET);
	K(VFIO_DEVICE_FEATURE_SET);
	K(VFIO_DEVICE_FEATURE_PROBE);
	K(VFIO_DEVICE_FEATURE_MIGRATION);
	K(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
	K(VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
	K(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
	K(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
	K(VFIO_PCI_NUM_REGIONS);
	K(VFIO_PCI_NUM_IRQS);
	K(VFIO_PCI_BAR0_REGION_INDEX);
	K(VFIO_PCI_BAR1_REGION_INDEX);
	K(VFIO_PCI_BAR2_REGION_INDEX);
	K(VFIO_PCI_BAR3_REGION_INDEX);
	K(VFIO_PCI_BAR4_REGION_INDEX);
	K(VFIO_PCI_BAR5_REGION_INDEX);
	K(VFIO_PCI_ROM_REGION_INDEX);
	K(VFIO_PCI_CONFIG_REGION_INDEX);
	K(VFIO_PCI_VGA_REGION_INDEX);
	K(VFIO_PCI_INTX_IRQ_INDEX);
	K(VFIO_PCI_MSI_IRQ_INDEX);
	K(VFIO_PCI_MSIX_IRQ_INDEX);
	K(VFIO_PCI_ERR_IRQ_INDEX);
	K(VFIO_PCI_REQ_IRQ_INDEX);
	SZ(vfio_region_info);
	OFF(vfio_region_info, argsz);
	OFF(vfio_region_info, flags);
	OFF(vfio_region_info, index);
	OFF(vfio_region_info, cap_offset);
	OFF(vfio_region_info, size);
	OFF(vfio_region_info, offset);
	SZ(vfio_irq_info);
	OFF(vfio_irq_info, argsz);
	OFF(vfio_irq_info, flags);
	OFF(vfio_irq_info, index);
	OFF(vfio_irq_info, count);
	SZ(vfio_irq_set);
	OFF(vfio_irq_set, argsz);
	OFF(vfio_irq_set, flags);
	OFF(vfio_irq_set, index);
	OFF(vfio_irq_set, start);
	OFF(vfio_irq_set, count);
	SZ(vfio_device_feature);
	OFF(vfio_device_feature, argsz);
	OFF(vfio_device_feature, flags);
	return 0;
}
