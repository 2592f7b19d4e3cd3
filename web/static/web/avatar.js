// An avatar picked from a file: kept as it is when it is small, otherwise
// scaled down in a canvas, so uploads stay well under the server's limit.

const KEEP_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const MAX_SIDE = 512;

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("not an image"));
    image.src = src;
  });
}

function encode(image, side, type, quality) {
  const scale = Math.min(1, side / Math.max(image.naturalWidth, image.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  const url = canvas.toDataURL(type, quality);
  // A browser that cannot write WebP gives PNG back; JPEG is then smaller.
  return url.startsWith(`data:${type}`) ? url : canvas.toDataURL("image/jpeg", quality);
}

/** A data URL for `file`, at most `maxBytes` decoded; rejects when it is not an image. */
export async function readAvatar(file, maxBytes) {
  const original = await readAsDataUrl(file);
  const image = await loadImage(original);
  const small = Math.max(image.naturalWidth, image.naturalHeight) <= MAX_SIDE;
  if (small && KEEP_TYPES.includes(file.type) && file.size <= maxBytes) return original;
  for (const [side, quality] of [[MAX_SIDE, 0.88], [384, 0.82], [256, 0.75], [160, 0.7]]) {
    const url = encode(image, side, "image/webp", quality);
    if ((url.length - url.indexOf(",") - 1) * 0.75 <= maxBytes) return url;
  }
  return encode(image, 96, "image/jpeg", 0.7);
}
