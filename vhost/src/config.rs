//! The virtio-blk device configuration space (`struct virtio_blk_config`,
//! VIRTIO 1.2 section 5.2.4) and the feature bits the server offers.

use crate::request::{Limits, SECTOR};

/// virtio and virtio-blk feature bits (VIRTIO 1.2, 5.2.3 and 6), from
/// the kernel's headers (virtio-bindings).
pub mod feature {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE as BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE as CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD as DISCARD, VIRTIO_BLK_F_FLUSH as FLUSH, VIRTIO_BLK_F_MQ as MQ,
        VIRTIO_BLK_F_RO as RO, VIRTIO_BLK_F_SEG_MAX as SEG_MAX, VIRTIO_BLK_F_SIZE_MAX as SIZE_MAX,
        VIRTIO_BLK_F_TOPOLOGY as TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES as WRITE_ZEROES,
    };
    pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as VERSION_1;
    pub use virtio_bindings::virtio_ring::{
        VIRTIO_RING_F_EVENT_IDX as RING_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC as RING_INDIRECT_DESC,
    };
}

/// Bytes of the configuration space up to and including the write-zeroes
/// fields (what a device offering DISCARD and WRITE_ZEROES must provide).
pub const CONFIG_LEN: usize = 60;

/// Physical block: the engine tracks validity per 4 KiB block, so smaller
/// writes cost a read-modify-write.
pub const PHYSICAL_BLOCK: u32 = 4096;

/// Everything the configuration space says, in host units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Volume size in bytes (a multiple of 512).
    pub size_bytes: u64,
    /// Largest data segment, in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size the guest uses: 512 or 4096.
    pub blk_size: u32,
    /// Optimal I/O size in bytes (the pool's allocation chunk).
    pub opt_io_bytes: u64,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// Write-back cache: the guest must FLUSH for durability.
    pub writeback: bool,
    pub read_only: bool,
}

impl BlkConfig {
    /// Sensible limits for a volume of `size_bytes` served with
    /// `num_queues` queues of at most `queue_size` entries.
    pub fn new(size_bytes: u64, blk_size: u32, opt_io_bytes: u64, num_queues: u16) -> BlkConfig {
        BlkConfig {
            size_bytes,
            size_max: 1 << 20,
            // Linux sizes its scatter lists by seg_max; a 128-entry queue
            // without indirect descriptors still fits header + status.
            seg_max: 126,
            blk_size,
            opt_io_bytes,
            num_queues,
            // 1 GiB per range: a discard is a metadata update in the engine.
            max_discard_sectors: 1 << 21,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 21,
            max_write_zeroes_seg: 32,
            writeback: true,
            read_only: false,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size_bytes / SECTOR
    }

    /// Virtio feature bits offered for this configuration.
    pub fn features(&self) -> u64 {
        use feature::*;
        let mut f = 0u64;
        for bit in [
            VERSION_1,
            RING_EVENT_IDX,
            RING_INDIRECT_DESC,
            MQ,
            SEG_MAX,
            SIZE_MAX,
            BLK_SIZE,
            TOPOLOGY,
            FLUSH,
            CONFIG_WCE,
            DISCARD,
            WRITE_ZEROES,
        ] {
            f |= 1 << bit;
        }
        if self.read_only {
            f |= 1 << RO;
        }
        f
    }

    /// The limits request parsing enforces.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity_sectors(),
            max_discard_sectors: self.max_discard_sectors,
            max_discard_seg: self.max_discard_seg,
            max_write_zeroes_sectors: self.max_write_zeroes_sectors,
            max_write_zeroes_seg: self.max_write_zeroes_seg,
            max_transfer: self.size_max as u64 * self.seg_max.max(1) as u64,
        }
    }

    /// The little-endian configuration space.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let put = |b: &mut [u8; CONFIG_LEN], off: usize, v: &[u8]| {
            b[off..off + v.len()].copy_from_slice(v)
        };
        let blk = self.blk_size.max(512);
        put(&mut b, 0, &self.capacity_sectors().to_le_bytes());
        put(&mut b, 8, &self.size_max.to_le_bytes());
        put(&mut b, 12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, unused (GEOMETRY not offered).
        put(&mut b, 20, &blk.to_le_bytes());
        // Topology: logical blocks per physical block as a power of two,
        // minimum I/O one physical block, optimal I/O one chunk.
        let phys_exp = (PHYSICAL_BLOCK.max(blk) / blk).trailing_zeros() as u8;
        b[24] = phys_exp;
        b[25] = 0; // alignment offset
        let min_io = (PHYSICAL_BLOCK.max(blk) / blk) as u16;
        put(&mut b, 26, &min_io.to_le_bytes());
        let opt_io = (self.opt_io_bytes / blk as u64).min(u32::MAX as u64) as u32;
        put(&mut b, 28, &opt_io.to_le_bytes());
        b[32] = self.writeback as u8;
        put(&mut b, 34, &self.num_queues.to_le_bytes());
        put(&mut b, 36, &self.max_discard_sectors.to_le_bytes());
        put(&mut b, 40, &self.max_discard_seg.to_le_bytes());
        // Discard alignment in 512-byte sectors: one 4 KiB block, the
        // granularity at which the engine unmaps.
        let align = (PHYSICAL_BLOCK as u64 / SECTOR) as u32;
        put(&mut b, 44, &align.to_le_bytes());
        put(&mut b, 48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(&mut b, 52, &self.max_write_zeroes_seg.to_le_bytes());
        b[56] = 1; // write_zeroes_may_unmap
        b
    }

    /// `size` bytes of the configuration space from `offset`, zero past
    /// its end (the front end decides how much it reads).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < CONFIG_LEN {
            let n = (CONFIG_LEN - start).min(out.len());
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn layout_for_512_byte_blocks() {
        let c = BlkConfig::new(8 << 30, 512, 1 << 20, 4);
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 16 << 20);
        assert_eq!(u32_at(&b, 8), 1 << 20);
        assert_eq!(u32_at(&b, 12), 126);
        assert_eq!(u32_at(&b, 20), 512);
        assert_eq!(b[24], 3, "4 KiB physical blocks = 2^3 logical blocks");
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 8);
        assert_eq!(u32_at(&b, 28), 2048, "opt_io = 1 MiB chunk in 512 B blocks");
        assert_eq!(b[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(u32_at(&b, 36), 1 << 21);
        assert_eq!(u32_at(&b, 40), 32);
        assert_eq!(u32_at(&b, 44), 8, "discard alignment 4 KiB");
        assert_eq!(u32_at(&b, 48), 1 << 21);
        assert_eq!(u32_at(&b, 52), 32);
        assert_eq!(b[56], 1);
        assert_eq!(&b[57..60], &[0, 0, 0]);
    }

    #[test]
    fn layout_for_4k_blocks() {
        let c = BlkConfig::new(1 << 30, 4096, 4 << 20, 1);
        let b = c.to_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            2 << 20,
            "capacity stays in 512 B sectors"
        );
        assert_eq!(u32_at(&b, 20), 4096);
        assert_eq!(b[24], 0);
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 1);
        assert_eq!(u32_at(&b, 28), 1024);
    }

    #[test]
    fn partial_reads_and_padding() {
        let c = BlkConfig::new(1 << 30, 512, 1 << 20, 2);
        let all = c.to_bytes();
        assert_eq!(c.read(0, 60), all.to_vec());
        assert_eq!(c.read(20, 4), all[20..24].to_vec());
        let long = c.read(0, 100);
        assert_eq!(long.len(), 100);
        assert_eq!(&long[..60], &all[..]);
        assert!(long[60..].iter().all(|&x| x == 0));
        assert_eq!(c.read(200, 8), vec![0; 8]);
        assert_eq!(c.read(u32::MAX, 0), Vec::<u8>::new());
    }

    #[test]
    fn features() {
        let mut c = BlkConfig::new(1 << 30, 512, 1 << 20, 1);
        let f = c.features();
        for bit in [1, 2, 6, 9, 10, 11, 12, 13, 14, 28, 29, 32] {
            assert!(f & (1 << bit) != 0, "bit {bit}");
        }
        assert_eq!(f & (1 << feature::RO), 0);
        c.read_only = true;
        assert!(c.features() & (1 << feature::RO) != 0);
        assert_eq!(c.limits().capacity, 2 << 20);
    }
}
