// A producer outside datumflow, in Node.js: put files into an S3 bucket, then announce them as one
// commit of a datumflow repo, referenced in place (`source`), so that every pipeline reading the
// repo runs on them. See docs/producers.md.
//
//   node publish.mjs --repo images --bucket camera --prefix incoming [--append] FILE...
//
// Environment: NATS_URL (default nats://127.0.0.1:4222), S3_ENDPOINT (for MinIO or another
// S3-compatible store; unset for AWS), AWS_REGION and the usual AWS credentials. Without --append
// the files become the branch's whole content; with it, they are added to the branch's head.
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import { parseArgs } from "node:util";

import { PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { connect, JSONCodec } from "nats";

const { values: opts, positionals: files } = parseArgs({
  allowPositionals: true,
  options: {
    repo: { type: "string" },
    branch: { type: "string", default: "master" },
    bucket: { type: "string" },
    prefix: { type: "string", default: "" },
    append: { type: "boolean", default: false },
  },
});
if (!opts.repo || !opts.bucket || files.length === 0) {
  console.error("usage: node publish.mjs --repo REPO --bucket BUCKET [--prefix P] [--append] FILE...");
  process.exit(2);
}

// 1. The bytes: into the bucket, with whatever S3 client the producer already uses. What the event
//    needs from each upload is where the object is, its size and its ETag (which pins this very
//    version: a worker refuses to read the object if it has changed since).
const s3 = new S3Client({
  region: process.env.AWS_REGION ?? "us-east-1",
  ...(process.env.S3_ENDPOINT ? { endpoint: process.env.S3_ENDPOINT, forcePathStyle: true } : {}),
});
const refs = [];
for (const file of files) {
  const body = await readFile(file);
  const key = [opts.prefix.replace(/^\/+|\/+$/g, ""), basename(file)].filter(Boolean).join("/");
  const put = await s3.send(new PutObjectCommand({ Bucket: opts.bucket, Key: key, Body: body }));
  const source = { url: `s3://${opts.bucket}/${key}`, etag: put.ETag.replaceAll('"', "") };
  if (put.VersionId) source.version_id = put.VersionId; // versioned buckets: pin the version too
  refs.push({ path: `/${basename(file)}`, size: body.length, source });
}
s3.destroy();

// 2. The commit event, on df.commit.<repo> of the DF_COMMITS stream. The commit id is ours to
//    choose (1-128 letters, digits, '_' or '-'), new for every commit, and also the message id, so
//    that publishing the same event again after a timeout makes no second commit.
const nc = await connect({ servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222" });
try {
  const js = nc.jetstream();
  const commit = randomUUID().replaceAll("-", "");
  const event = { v: 1, repo: opts.repo, branch: opts.branch, commit, origin: "external", files: refs };
  if (opts.append) {
    // Adding to what is there: `parent` names the head we add to, read from the branch's record
    // (KV bucket df_branches, key <repo>.<branch>). Should another commit land before ours is
    // recorded, ours is refused to df.dead.planner rather than applied on a head we never saw.
    const branches = await js.views.kv("df_branches", { bindOnly: true });
    const record = await branches.get(`${opts.repo}.${opts.branch}`);
    if (record?.value?.length) event.parent = record.json().head;
  }
  const ack = await js.publish(`df.commit.${opts.repo}`, JSONCodec().encode(event), {
    msgID: commit,
  });
  console.log(
    JSON.stringify({
      commit,
      parent: event.parent ?? "",
      stream: ack.stream,
      seq: ack.seq,
      duplicate: ack.duplicate,
      files: refs.length,
    }),
  );
} finally {
  await nc.drain();
}
