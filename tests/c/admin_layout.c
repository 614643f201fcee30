/* Prints the virtio 1.4 admin-command layouts of Linux's uapi <linux/virtio_pci.h> as
 * key=value lines for tests/test_wire_admin_c_headers.py.  Built only when the installed
 * headers define the device-parts commands (VIRTIO_ADMIN_CMD_DEV_MODE_SET). */
#include <stddef.h>
#include <stdio.h>
#include <linux/virtio_pci.h>

#define SIZE(t) printf("sizeof." #t "=%zu\n", sizeof(struct t))
#define OFF(t, f) printf(#t "." #f "=%zu\n", offsetof(struct t, f))
#define CONST(c) printf(#c "=%lld\n", (long long)(c))

int main(void)
{
	SIZE(virtio_admin_cmd_hdr);
	OFF(virtio_admin_cmd_hdr, opcode);
	OFF(virtio_admin_cmd_hdr, group_type);
	OFF(virtio_admin_cmd_hdr, reserved1);
	OFF(virtio_admin_cmd_hdr, group_member_id);
	SIZE(virtio_admin_cmd_status);
	OFF(virtio_admin_cmd_status, status);
	OFF(virtio_admin_cmd_status, status_qualifier);
	OFF(virtio_admin_cmd_status, reserved2);
	SIZE(virtio_dev_parts_cap);
	SIZE(virtio_admin_cmd_cap_get_data);
	SIZE(virtio_admin_cmd_resource_obj_cmd_hdr);
	OFF(virtio_admin_cmd_resource_obj_cmd_hdr, id);
	SIZE(virtio_admin_cmd_resource_obj_create_data);
	OFF(virtio_admin_cmd_resource_obj_create_data, flags);
	SIZE(virtio_resource_obj_dev_parts);
	SIZE(virtio_admin_cmd_dev_parts_metadata_data);
	OFF(virtio_admin_cmd_dev_parts_metadata_data, type);
	SIZE(virtio_admin_cmd_dev_parts_get_data);
	SIZE(virtio_admin_cmd_dev_parts_set_data);
	SIZE(virtio_dev_part_hdr);
	OFF(virtio_dev_part_hdr, part_type);
	OFF(virtio_dev_part_hdr, flags);
	OFF(virtio_dev_part_hdr, selector);
	OFF(virtio_dev_part_hdr, length);
	SIZE(virtio_admin_cmd_dev_mode_set_data);
	CONST(VIRTIO_PCI_COMMON_ADM_Q_IDX);
	CONST(VIRTIO_PCI_COMMON_ADM_Q_NUM);
	CONST(VIRTIO_ADMIN_STATUS_OK);
	CONST(VIRTIO_ADMIN_CMD_LIST_QUERY);
	CONST(VIRTIO_ADMIN_CMD_LIST_USE);
	CONST(VIRTIO_ADMIN_GROUP_TYPE_SRIOV);
	CONST(VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY);
	CONST(VIRTIO_ADMIN_CMD_DEVICE_CAP_GET);
	CONST(VIRTIO_ADMIN_CMD_DRIVER_CAP_SET);
	CONST(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE);
	CONST(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_GET);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_SET);
	CONST(VIRTIO_ADMIN_CMD_DEV_MODE_SET);
	CONST(VIRTIO_DEV_PARTS_CAP);
	CONST(VIRTIO_RESOURCE_OBJ_DEV_PARTS);
	CONST(VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET);
	CONST(VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED);
	CONST(VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL);
	CONST(VIRTIO_DEV_PART_F_OPTIONAL);
	CONST(VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED);
	return 0;
}
