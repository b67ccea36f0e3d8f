//! The feed's wire format: length-prefixed JSON frames (4-byte big-endian length), one
//! message each. JSON keeps a captured stream readable; a change batch is encoded once on
//! the manager and the same bytes go to every subscriber.
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    model::{Change, NodeReport},
    source::TaskHint,
};

/// Bumped when a message changes incompatibly; a manager refuses other versions by name.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts (a snapshot of a very large swarm fits).
pub const MAX_FRAME: usize = 512 << 20;

/// A node's meshd → a manager's meshd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Up {
    /// First message. `subscribe`: send me the swarm. `resume`: the feed epoch and
    /// sequence number last applied, to get only what came after.
    Hello {
        version: u32,
        subscribe: bool,
        resume: Option<(u64, u64)>,
    },
    /// What only this node knows (replaces its previous report).
    Report(NodeReport),
    /// A task container of this node changed: its service's tasks are worth re-reading.
    Hint(TaskHint),
}

/// A manager's meshd → a node's meshd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Down {
    /// The whole view, as changes that rebuild it, as of `seq`.
    Snapshot {
        epoch: u64,
        seq: u64,
        changes: Vec<Change>,
    },
    /// Changes after `seq - 1`.
    Batch { seq: u64, changes: Vec<Change> },
    /// Nothing changed for a while; the link is alive.
    Ping,
    /// Why the manager closes the link.
    Refused { reason: String },
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The frame for a message (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, msg).expect("messages serialize");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(serde_json::from_slice(&buf)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resync;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let msgs = vec![
            Down::Snapshot {
                epoch: 7,
                seq: 3,
                changes: vec![Change::Resync(Resync::Reports(vec![]))],
            },
            Down::Ping,
            Down::Batch {
                seq: 4,
                changes: vec![Change::DropTask("t1".into())],
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode(m));
        }
        let mut r = wire.as_slice();
        let mut got = Vec::new();
        while let Some(m) = read::<_, Down>(&mut r).await.unwrap() {
            got.push(m);
        }
        assert_eq!(got, msgs);
    }

    #[tokio::test]
    async fn an_oversized_or_garbled_frame_is_an_error_not_a_panic() {
        let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        big.extend([0u8; 8]);
        assert!(matches!(
            read::<_, Down>(&mut big.as_slice()).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend(b"{x}");
        assert!(matches!(
            read::<_, Up>(&mut junk.as_slice()).await,
            Err(FrameError::Decode(_))
        ));
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend(b"{}");
        assert!(
            read::<_, Up>(&mut short.as_slice()).await.is_err(),
            "cut mid-frame"
        );
    }
}
